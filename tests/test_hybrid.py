"""The n-gram index, the lookup drafter and hybrid lookup + sorted drafting: lossless, greedy and sampled."""

from __future__ import annotations

import pytest
import torch

from s2d.drafting import SortedConfig, SortedDrafter
from s2d.drafting.hybrid import HybridConfig, HybridDrafter
from s2d.drafting.ngram import NgramConfig, NgramDrafter, NgramIndex
from s2d.engine import Engine
from s2d.model.loading import load_model
from s2d.sampling import SamplingParams
from stats import chi2_critical, exact_two_tokens, lumped_chi2, total_variation
from tinymodels import small_vocab_model


def test_index_follows_the_latest_longest_match():
    index = NgramIndex(NgramConfig(max_n=3, min_n=1, min_match=1))
    index.sync([1, 2, 3, 9, 1, 2, 4, 7, 2])
    assert index.follow([1, 2]) == (4, 2)  # the latest (1, 2) was followed by 4
    assert index.follow([5, 2]) == (4, 1)  # only the 1-gram (2,) matches: latest follower 4
    assert index.follow([3]) == (9, 1)
    assert index.follow([8]) is None
    index.sync([1, 2, 3, 9, 1, 2, 3])  # diverged from what was indexed: rebuilt
    assert index.tokens == [1, 2, 3, 9, 1, 2, 3] and index.follow([1, 2]) == (3, 2)


def test_lookup_drafts_across_passages_and_respects_min_match():
    drafter = NgramDrafter(NgramConfig(max_n=4, min_n=1, min_match=2))
    context = [5, 6, 7, 8, 40, 41, 42, 5, 6]
    tokens, match = drafter.lookup(context, 6)
    assert tokens == [7, 8, 40, 41, 42, 5] and match == 2
    assert drafter.lookup([5, 6, 7, 8, 40, 9, 7], 4) == ([], 0)  # (7,) alone is below min_match


@pytest.fixture(scope="module")
def models(small_target_dir, sorted_draft_dir):
    return load_model(small_target_dir, dtype="float32"), load_model(sorted_draft_dir, dtype="float32")


PROMPTS = [list(range(60, 80)) * 3, [7, 3, 9, 7, 3, 1, 12, 40, 41, 42]]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_hybrid_and_lookup_equal_plain_decoding(models, prompt):
    target, draft = models
    expected = Engine(target, eos_token_ids=()).generate(prompt, SamplingParams(), 40).output
    lookup = Engine(target, NgramDrafter(), 8, eos_token_ids=()).generate(prompt, SamplingParams(), 40)
    assert lookup.output == expected
    hybrid = HybridDrafter(SortedDrafter(draft, SortedConfig((1, 2, 3), (0.05, 0.05, 0.0))), HybridConfig())
    state = Engine(target, hybrid, 8, eos_token_ids=()).generate(prompt, SamplingParams(), 40)
    assert state.output == expected
    if prompt is PROMPTS[0]:
        assert state.stats.target_passes < 40  # the repeated prompt is copied, several tokens per pass


def test_sampling_through_the_hybrid_drafter_keeps_the_target_distribution():
    """Lookup tokens are drafted with a one-hot q: the output must still be distributed as the target's."""
    target = small_vocab_model(2, seed=3, head_scale=4.0)
    draft = small_vocab_model(3, seed=4, exits=(1, 2, 3), head_scale=4.0)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]  # the tail (1, 2) was followed by 3: lookup proposes 3, 1, 2, ...
    _, exact = exact_two_tokens(target, prompt)  # exact P(x1, x2 | prompt) of the target
    hybrid = HybridDrafter(SortedDrafter(draft, SortedConfig((1, 2, 3), (0.6, 0.6, 0.0))),
                           HybridConfig(min_lookup=1, lookup_tokens=4, ngram=NgramConfig(max_n=3, min_match=1),
                                        cost_aware=False))  # both kinds of draft on every step
    engine = Engine(target, hybrid, 4, eos_token_ids=())
    n = 4000
    counts = torch.zeros(64)
    lookup_tokens = model_tokens = 0
    for i in range(n):
        state = engine.generate(prompt, SamplingParams(temperature=1.0, seed=i), 3)
        counts[state.output[0] * 8 + state.output[1]] += 1
        exits = state.stats.exit_counts
        lookup_tokens += exits.get(0, 0)
        model_tokens += sum(c for e, c in exits.items() if e)
    assert lookup_tokens > n // 2 and model_tokens > n // 4  # both kinds of draft were verified
    tv = total_variation(counts, exact)
    assert tv < 0.06, tv
    stat, df = lumped_chi2(counts, exact * n)  # goodness of fit
    assert stat < chi2_critical(df), stat


def test_cost_aware_hybrid_stops_asking_a_draft_that_does_not_pay(models):
    """Where lookup has nothing, the model drafts only while its accepted tokens outweigh its cost."""
    target, draft = models
    prompt = PROMPTS[1]
    expected = Engine(target, eos_token_ids=()).generate(prompt, SamplingParams(), 60).output
    model_steps = {}
    for cost in (0.0, 50.0):  # a free draft (free to verify too), and one dearer than anything it could save
        config = HybridConfig(retry=16, gamma=0.0 if cost == 0 else 0.06)
        hybrid = HybridDrafter(SortedDrafter(draft, SortedConfig((1,), (0.0,))), config, target)
        engine = Engine(target, hybrid, 8, eos_token_ids=())
        assert hybrid.cost > 0  # bound to the target when built: bytes of the draft's exit over the target's
        hybrid.cost = cost
        state = engine.generate(prompt, SamplingParams(), 60)
        assert state.output == expected
        model_steps[cost] = hybrid_model_steps(state)
    assert model_steps[50.0] <= 5 * 8  # the first try, then one retry every 16 plain steps (<= 8 tokens each)
    assert model_steps[0.0] > model_steps[50.0]


def hybrid_model_steps(state) -> int:
    """Model-drafted tokens (exit > 0 in the exit histogram)."""
    return sum(c for e, c in state.stats.exit_counts.items() if e)
