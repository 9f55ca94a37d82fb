"""Pure acceptance rules for a chain of draft tokens (Leviathan et al. 2023; Chen et al. 2023).

p = target distribution, q = draft distribution. Accept draft token x with probability
min(1, p(x)/q(x)); at the first rejection sample from norm(max(0, p - q)); after a fully accepted
chain sample a bonus token from p. At temperature 0 this reduces to greedy prefix matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Verdict:
    num_accepted: int  # draft tokens kept, a prefix of the chain
    next_token: int  # recovered token (after a rejection) or bonus token (after full acceptance)


def verify_greedy(draft_tokens: Tensor, target_argmax: Tensor) -> Verdict:
    """draft_tokens [k]; target_argmax [k+1], the target's choice after each prefix."""
    k = draft_tokens.numel()
    mismatch = (draft_tokens != target_argmax[:k]).nonzero()
    n = int(mismatch[0]) if mismatch.numel() else k
    return Verdict(n, int(target_argmax[n]))


def verify_stochastic(draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
                      generator: torch.Generator | None = None) -> Verdict:
    """draft_tokens [k]; draft_probs [k, V] (None: a deterministic draft, q one-hot); target_probs [k+1, V].

    The output token sequence is distributed exactly as sampling from target_probs one token at a time.
    """
    k = draft_tokens.numel()
    if draft_probs is None:
        draft_probs = torch.zeros_like(target_probs[:k]).scatter_(-1, draft_tokens[:, None], 1.0)
    idx = torch.arange(k, device=target_probs.device)
    p_x = target_probs[idx, draft_tokens]
    q_x = draft_probs[idx, draft_tokens]
    u = torch.rand(k, generator=generator, device=target_probs.device)
    rejected = (u * q_x >= p_x).nonzero()  # u < p/q, written without dividing by q
    n = int(rejected[0]) if rejected.numel() else k
    if n == k:
        residual = target_probs[k]
    else:
        residual = (target_probs[n] - draft_probs[n]).clamp_(min=0)
        if residual.sum() <= 0:  # p == q up to rounding: a rejection had probability ~0
            residual = target_probs[n]
    token = torch.multinomial(residual, 1, generator=generator)
    return Verdict(n, int(token))
