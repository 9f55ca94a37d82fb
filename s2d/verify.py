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
    # Compared as lists: a handful of tokens, right after a pass that has flushed the CPU's caches, where
    # each torch call costs 10-20 us (two conversions here in place of five tensor operations).
    draft, target = draft_tokens.tolist(), target_argmax.tolist()
    n = next((i for i, (d, t) in enumerate(zip(draft, target)) if d != t), len(draft))
    return Verdict(n, target[n])


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


@dataclass(frozen=True)
class TreeVerdict:
    path: list[int]  # accepted tree nodes, root to leaf
    next_token: int  # the target's token after the path


def _children(parents: list[int]) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        kids.setdefault(parent, []).append(i)
    return kids


def verify_tree_greedy(tokens: list[int], parents: list[int], target_argmax: Tensor) -> TreeVerdict:
    """The longest root-to-leaf path whose tokens are the target's argmax, plus the target's next token.

    tokens/parents [N] (topological order; parent -1 = the root); target_argmax [N+1]: the target's
    choice after the root (row 0) and after each node (row i+1).
    """
    kids = _children(parents)
    choice = target_argmax.tolist()
    path: list[int] = []
    node = -1
    while True:
        want = choice[node + 1]
        node = next((c for c in kids.get(node, ()) if tokens[c] == want), None)
        if node is None:
            return TreeVerdict(path, want)
        path.append(node)


def verify_tree_stochastic(tokens: list[int], parents: list[int], draft_probs: Tensor, target_probs: Tensor,
                           generator: torch.Generator | None = None) -> TreeVerdict:
    """Recursive rejection sampling (Jeon et al. 2024): lossless for children drawn without replacement.

    draft_probs [N, V]: the q each node was drawn from (its parent's, the same for siblings);
    target_probs [N+1, V] (row 0 the root's). At each node its children are tried in draw order: the
    i-th is accepted with probability min(1, p(x)/q(x)); on rejection p becomes the normalised residual
    max(p - q, 0) and q drops x and is renormalised (the next sibling's distribution given the earlier
    draws). If no child is accepted, the next token is drawn from the current p.
    """
    kids = _children(parents)
    path: list[int] = []
    node = -1
    while True:
        p = target_probs[node + 1].double()
        children = kids.get(node, [])
        q = draft_probs[children[0]].double().clone() if children else None
        accepted = None
        for child in children:
            x = tokens[child]
            u = torch.rand((), generator=generator, device=p.device, dtype=torch.float64)
            if u * q[x] < p[x]:  # u < p(x)/q(x), without dividing by q
                accepted = child
                break
            p = (p - q).clamp_(min=0)
            total = p.sum()
            p = p / total if total > 0 else target_probs[node + 1].double()
            q[x] = 0
            q_total = q.sum()
            if q_total <= 0:
                break
            q = q / q_total
        if accepted is None:
            return TreeVerdict(path, int(torch.multinomial(p.float(), 1, generator=generator)))
        path.append(accepted)
        node = accepted
