"""Prompt lookup decoding: copy what followed the latest earlier occurrence of the context's tail."""

from __future__ import annotations

import torch

from s2d.drafting.base import Draft, Drafter
from s2d.sampling import SamplingParams


class PromptLookupDrafter(Drafter):
    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: list[int], max_tokens: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        n_ctx = len(context)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            tail = context[-n:]
            first = tail[0]
            # Scan backwards: the latest match best predicts a repetitive continuation.
            for start in range(n_ctx - n - 1, -1, -1):
                if context[start] == first and context[start:start + n] == tail:
                    follow = context[start + n: start + n + max_tokens]
                    if follow:
                        return Draft(torch.tensor(follow, dtype=torch.long))
        return Draft.empty()
