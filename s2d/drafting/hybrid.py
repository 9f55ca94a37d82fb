"""Hybrid drafting: free lookup tokens where the text repeats, the draft model's tokens where it does not.

Each step first asks the n-gram index (``ngram.py``) for a continuation of the context's tail. When it
offers at least ``min_lookup`` tokens, those are the draft (they cost nothing to propose, and a
repetition tends to go on, so up to ``lookup_tokens`` are drafted); otherwise the model drafter (the
sorted cascade, or one fixed exit) drafts as usual. The model drafter's cache catches up on the
tokens it did not draft the next time it runs, in one pass.

Lookup tokens are deterministic: their q is one-hot, which speculative sampling verifies exactly
(accept with probability p(x)), so sampling stays lossless. They are reported as exit 0 in the
statistics' exit histogram.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from s2d.drafting.base import Draft, Drafter
from s2d.drafting.ngram import LOOKUP_EXIT, NgramConfig, NgramDrafter
from s2d.sampling import SamplingParams


@dataclass(frozen=True)
class HybridConfig:
    min_lookup: int = 2  # lookup tokens needed to skip the model for this step
    lookup_tokens: int = 8  # most lookup tokens drafted per step
    ngram: NgramConfig = NgramConfig()

    def __post_init__(self) -> None:
        if not 1 <= self.min_lookup <= self.lookup_tokens:
            raise ValueError(f"need 1 <= min_lookup <= lookup_tokens, got {self.min_lookup}, {self.lookup_tokens}")


class HybridDrafter:
    def __init__(self, model: Drafter, config: HybridConfig = HybridConfig()) -> None:
        self.model = model
        self.config = config
        self.lookup = NgramDrafter(config.ngram)
        self.last_from_lookup = False

    def reset(self) -> None:
        self.model.reset()
        self.lookup.reset()

    def feedback(self, num_proposed: int, num_accepted: int) -> None:
        # Lookup steps say nothing about the model's draft length.
        if not self.last_from_lookup:
            self.model.feedback(num_proposed, num_accepted)

    def propose(self, context: list[int], max_tokens: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        # max_tokens is the engine's cap (room left in the output); build_drafter sizes it to allow
        # lookup_tokens, while the model drafter keeps its own draft length.
        tokens, _ = self.lookup.lookup(context, min(max_tokens, self.config.lookup_tokens))
        self.last_from_lookup = len(tokens) >= self.config.min_lookup
        if self.last_from_lookup:
            return Draft(torch.tensor(tokens, dtype=torch.long), exits=[LOOKUP_EXIT] * len(tokens))
        return self.model.propose(context, max_tokens, params, generator)
