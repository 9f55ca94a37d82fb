"""Acceptance rules: table-driven greedy cases and the distribution test of the rejection sampler.

The distribution test follows vLLM's: a small vocabulary, random target and draft, many samples;
the empirical distribution of the output must converge to the target's, far closer than to a
reference distribution.
"""

from __future__ import annotations

import pytest
import torch

from s2d.sampling import SamplingParams, probabilities
from s2d.verify import verify_greedy, verify_stochastic
from stats import total_variation

V = 10


@pytest.mark.parametrize("draft,target,accepted,next_token", [
    ([], [4], 0, 4),  # nothing drafted: the target's own token
    ([1, 2, 3], [1, 2, 3, 9], 3, 9),  # all accepted + bonus
    ([1, 2, 3], [5, 2, 3, 9], 0, 5),  # first rejected: the target's token replaces it
    ([1, 2, 3], [1, 7, 3, 9], 1, 7),
    ([1, 2, 3], [1, 2, 8, 9], 2, 8),
])
def test_greedy_prefix_match(draft, target, accepted, next_token):
    verdict = verify_greedy(torch.tensor(draft, dtype=torch.long), torch.tensor(target))
    assert (verdict.num_accepted, verdict.next_token) == (accepted, next_token)


def test_deterministic_draft_with_certain_target_is_accepted():
    p = torch.zeros(3, V).scatter_(1, torch.tensor([[2], [5], [7]]), 1.0)
    verdict = verify_stochastic(torch.tensor([2, 5]), None, p, torch.Generator().manual_seed(0))
    assert (verdict.num_accepted, verdict.next_token) == (2, 7)


def markov_tables(seed: int, disjoint: bool = False, same: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and draft 'models' [V prev, V next] of logits: the next token depends on the previous one."""
    g = torch.Generator().manual_seed(seed)
    p_logits = torch.randn(V, V, generator=g) * 2
    q_logits = p_logits.clone() if same else torch.randn(V, V, generator=g) * 2
    if disjoint:  # target only emits 0..4, draft only 5..9: every draft token is rejected
        p_logits[:, V // 2:] = -torch.inf
        q_logits[:, : V // 2] = -torch.inf
    return p_logits, q_logits


def speculative_pairs(p_logits, q_logits, params: SamplingParams, k: int, n: int, seed: int) -> torch.Tensor:
    """Sample the first two tokens after token 0, n times, by drafting k and verifying. Returns [n] pair ids."""
    g = torch.Generator().manual_seed(seed)
    p_table, q_table = probabilities(p_logits, params), probabilities(q_logits, params)
    out = torch.empty(n, dtype=torch.long)
    for s in range(n):
        seq = [0]
        while len(seq) < 3:
            drafts, prev = [], seq[-1]
            for _ in range(k):
                prev = int(torch.multinomial(q_table[prev], 1, generator=g))
                drafts.append(prev)
            draft = torch.tensor(drafts)
            prevs = torch.tensor([seq[-1]] + drafts)
            verdict = verify_stochastic(draft, q_table[prevs[:-1]], p_table[prevs], g)
            seq += drafts[: verdict.num_accepted] + [verdict.next_token]
        out[s] = seq[1] * V + seq[2]
    return out


CASES = [  # (k, temperature, top_p, kind)
    (1, 1.0, 1.0, "random"), (2, 0.7, 1.0, "random"), (3, 1.3, 0.9, "random"), (4, 1.0, 0.8, "random"),
    (2, 1.0, 1.0, "same"), (3, 1.0, 1.0, "disjoint"),
]


@pytest.mark.parametrize("k,temperature,top_p,kind", CASES)
def test_rejection_sampler_output_converges_to_target(k, temperature, top_p, kind):
    params = SamplingParams(temperature=temperature, top_p=top_p)
    p_logits, q_logits = markov_tables(seed=k, disjoint=kind == "disjoint", same=kind == "same")
    p_table = probabilities(p_logits, params)
    exact = (p_table[0][:, None] * p_table).reshape(-1)  # P(x1, x2) = p(x1|0) p(x2|x1)
    # Reference: what one would get by keeping the draft's tokens unverified.
    q_table = probabilities(q_logits, params)
    reference = (q_table[0][:, None] * q_table).reshape(-1)
    pairs = speculative_pairs(p_logits, q_logits, params, k, n=12000, seed=100 + k)
    counts = torch.bincount(pairs, minlength=V * V).float()
    small = total_variation(torch.bincount(pairs[:1200], minlength=V * V).float(), exact)
    large = total_variation(counts, exact)
    # Expected TV of 12000 samples over <=100 cells is ~0.03; with 1200 samples ~0.1.
    assert large < 0.05
    assert large < small
    if kind != "same":
        assert large < 0.25 * 0.5 * float((reference - exact).abs().sum())
