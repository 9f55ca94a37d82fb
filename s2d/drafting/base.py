"""The proposer side of speculative decoding: every drafting method speaks this interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from s2d.sampling import SamplingParams


@dataclass
class Draft:
    tokens: Tensor  # [k] long, the proposed continuation (k may be 0)
    probs: Tensor | None = None  # [k, V] the q each token was drawn from; None = deterministic (one-hot)
    exits: list[int] = field(default_factory=list)  # per token, the exit (layer count) that produced it

    def __len__(self) -> int:
        return self.tokens.numel()

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> "Draft":
        return cls(torch.empty(0, dtype=torch.long, device=device))


class Drafter(Protocol):
    """Proposes up to ``max_tokens`` tokens to follow ``context``.

    ``context`` is the full token sequence so far (prompt + output). Drafters that keep a cache
    reconcile it with ``context`` themselves, so rejected tokens need no explicit rollback call.
    """

    def propose(self, context: list[int], max_tokens: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft: ...

    def feedback(self, num_proposed: int, num_accepted: int) -> None:
        """Told after each verification; adaptive drafters tune their length here."""

    def reset(self) -> None:
        """Forget all per-sequence state."""


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo = 0
    while a[lo] == b[lo]:
        lo += 1
    return lo
