"""Per-token losses: SoFT's cross-entropy over exits and the distillation divergences of DistillSpec.

Convention (as everywhere in s2d): p = target (teacher) distribution, q = draft distribution. All
functions take logits and work on the full vocabulary in float32; they return *per-token* values
[N] so the trainer can sum them and normalise by a global token count (exact under DDP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Divergence = Literal["fkl", "rkl", "jsd", "tvd"]
DIVERGENCES: tuple[str, ...] = ("fkl", "rkl", "jsd", "tvd")


@dataclass(frozen=True)
class DivergenceSpec:
    kind: Divergence = "fkl"
    beta: float = 0.5  # JSD(beta) only: weight of p in the mixture m = beta*p + (1-beta)*q

    def __post_init__(self) -> None:
        if self.kind not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.kind!r}; choose one of {', '.join(DIVERGENCES)}")
        if not 0 < self.beta < 1:
            raise ValueError(f"JSD beta must be in (0, 1), got {self.beta}")


def divergence(p_logits: Tensor, q_logits: Tensor, spec: DivergenceSpec) -> Tensor:
    """p_logits, q_logits [N, V] -> per-token divergence D(p, q) [N].

    fkl = KL(p || q); rkl = KL(q || p); jsd = beta KL(p || m) + (1 - beta) KL(q || m) with
    m = beta p + (1 - beta) q; tvd = 1/2 sum |p - q|.
    """
    logp = F.log_softmax(p_logits.float(), -1)
    logq = F.log_softmax(q_logits.float(), -1)
    if spec.kind == "fkl":
        return (logp.exp() * (logp - logq)).sum(-1)
    if spec.kind == "rkl":
        return (logq.exp() * (logq - logp)).sum(-1)
    if spec.kind == "tvd":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    b = spec.beta
    logm = torch.logaddexp(logp + math.log(b), logq + math.log(1 - b))
    return b * (logp.exp() * (logp - logm)).sum(-1) + (1 - b) * (logq.exp() * (logq - logm)).sum(-1)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """logits [N, V], labels [N] -> per-token next-token cross-entropy [N] (nats)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def exit_cross_entropies(exit_logits: list[Tensor], labels: Tensor) -> Tensor:
    """Each exit's per-token cross-entropy: [E x [N, V]], [N] -> [E, N] (the trainer logs each exit)."""
    return torch.stack([cross_entropy(z, labels) for z in exit_logits])


def soft_loss(exit_logits: list[Tensor], labels: Tensor) -> Tensor:
    """SoFT: per token, the mean over exits (equal weights) of the cross-entropy. [E x [N, V]], [N] -> [N]."""
    return exit_cross_entropies(exit_logits, labels).mean(0)


class TeacherMixture:
    """The targets' distributions at one batch of positions, prepared once for every exit.

    Forward KL is linear in p: mean_t KL(p_t || q) = mean_t sum p_t log p_t - sum pbar log q with
    pbar the mean of the p_t. So for fkl we keep only pbar and the mean negative entropy, and each
    exit costs one log_softmax instead of one per target (the same value, a third of the work for
    three targets). The other divergences are not linear in p and go pair by pair.
    """

    def __init__(self, teacher_logits: list[Tensor], spec: DivergenceSpec) -> None:
        # teacher_logits: per target [N, V]
        if not teacher_logits:
            raise ValueError("distillation needs at least one target")
        self.spec = spec
        self.logits = teacher_logits
        if spec.kind == "fkl":
            logps = [F.log_softmax(z.float(), -1) for z in teacher_logits]
            self.pbar = torch.stack([lp.exp() for lp in logps]).mean(0)  # [N, V]
            self.neg_entropy = torch.stack([(lp.exp() * lp).sum(-1) for lp in logps]).mean(0)  # [N]

    def loss(self, q_logits: Tensor) -> Tensor:
        """q_logits [N, V] -> per-token mean over targets of D(p_t, q) [N]."""
        if self.spec.kind == "fkl":
            return self.neg_entropy - (self.pbar * F.log_softmax(q_logits.float(), -1)).sum(-1)
        return torch.stack([divergence(p, q_logits, self.spec) for p in self.logits]).mean(0)


def exit_divergences(exit_logits: list[Tensor], teachers: TeacherMixture) -> Tensor:
    """Each exit's per-token divergence averaged over targets: [E x [N, V]] -> [E, N]."""
    return torch.stack([teachers.loss(z) for z in exit_logits])


def distill_loss(exit_logits: list[Tensor], teachers: TeacherMixture) -> Tensor:
    """Per token, the divergence averaged over exits and targets. [E x [N, V]] -> [N]."""
    return exit_divergences(exit_logits, teachers).mean(0)
