"""Statistics for the tests that check sampled outputs against exact distributions (a test utility, not tests)."""

from __future__ import annotations

import math

import torch

from s2d.model.llama import Transformer


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper quantile of chi-squared with ``df`` degrees of freedom (Wilson-Hilferty; z=3.09: p=0.001)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def pearson_chi2(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's statistic over the cells given (callers choose the cells, e.g. those expected > 0)."""
    return float(((observed - expected) ** 2 / expected).sum())


def lumped_chi2(observed: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Goodness of fit: cells expected >= 5 times, the rest lumped into one. Returns (statistic, degrees of
    freedom), to compare with ``chi2_critical``."""
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    return pearson_chi2(obs[keep], exp[keep]), int(keep.sum()) - 1


def total_variation(counts: torch.Tensor, dist: torch.Tensor) -> float:
    """Total variation distance between the empirical distribution of ``counts`` and ``dist``."""
    return 0.5 * float((counts / counts.sum() - dist).abs().sum())


def exact_two_tokens(target: Transformer, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's exact P(x1 | prompt) and P(x1, x2 | prompt) by enumeration (small vocabularies), the second
    flattened: index x1 * V + x2."""
    n, vocab = len(prompt), target.cfg.vocab_size
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]), torch.arange(n), target.new_cache())[0, -1].softmax(-1)
        seqs = torch.tensor([prompt + [a] for a in range(vocab)])
        p2 = target(seqs, torch.arange(n + 1), target.new_cache(batch=vocab))[:, -1].softmax(-1)
    return p1, (p1[:, None] * p2).reshape(-1)
