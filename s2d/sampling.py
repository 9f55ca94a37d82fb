"""Sampling parameters and the one logits -> distribution function used for both p and q.

Verification is lossless only if the target's p and the draft's q are processed identically and q is
exactly the distribution a draft token was drawn from, so every caller goes through ``probabilities``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from s2d.model.config import CheckpointError


TOP_P_MIN = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_p < TOP_P_MIN:  # compared with float32 masses it would be 0: every token dropped, NaN
            raise ValueError(f"top_p must be at least {TOP_P_MIN:.4g} (the smallest normal float32, which already "
                             f"keeps only the likeliest token; smaller values round to 0), got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """logits [..., V] -> float32 probabilities [..., V] after temperature, top-k and top-p.

    Greedy (temperature 0) gives the one-hot distribution of the argmax.
    """
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    # Shifted so the largest logit is 0 (softmax does not change): a tiny temperature then sends the
    # others to -inf instead of overflowing them all to +inf (NaN). The divisor is kept a normal
    # float32: a subnormal one would round to 0 and give 0/0 at the maximum.
    logits = (logits - logits.amax(-1, keepdim=True)) / max(params.temperature, torch.finfo(torch.float32).tiny)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits.softmax(-1)


NONFINITE = ("the {model} model computed NaN or inf logits: its weights hold NaN/inf, or its activations overflow "
             "in this dtype (try --dtype float32)")


def check_finite_logits(logits: Tensor, model: str) -> None:
    """Refuse NaN or inf logits: sampling from them would emit garbage (or crash) as if all were well.

    One sum, not ``isfinite(x).all()``: a NaN or inf anywhere makes the sum non-finite, and it costs far
    less per pass. The sum accumulates in float32 at least: float16 logits summed in float16 overflow past
    65504 for blocks of a few rows (a false alarm); float32 holds any finite sum of finite logits.
    """
    if not bool(torch.isfinite(logits.sum(dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32))):
        raise CheckpointError(NONFINITE.format(model=model))


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """probs [..., V] -> token ids [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
