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


@pytest.mark.parametrize("window", [0, 5, 16])
def test_the_draft_reads_the_context_from_its_window_and_outputs_stay_exact(models, window):
    """The model drafter is given the context from ``draft_window`` tokens before its first step on (0: all of it):
    its cache then holds no more than that window and what followed, and greedy output is still plain decoding's."""
    target, draft = models
    prompt = [7, 3, 9, 7, 3, 1, 12, 40, 41, 42] * 3 + [5, 11, 19]  # 33 tokens; lookup finds nothing at the end
    expected = Engine(target, eos_token_ids=()).generate(prompt, SamplingParams(), 24).output
    inner = SortedDrafter(draft, SortedConfig((1, 2, 3), (0.05, 0.05, 0.0)))
    hybrid = HybridDrafter(inner, HybridConfig(cost_aware=False, draft_window=window))
    seen: list[list[int]] = []
    proposal = inner.proposal

    def spy(context, *args, **kwargs):
        seen.append(list(context))
        return proposal(context, *args, **kwargs)

    inner.proposal = spy
    state = Engine(target, hybrid, 4, eos_token_ids=()).generate(prompt, SamplingParams(), 24)
    assert state.output == expected
    assert seen, "the model never drafted"
    first = seen[0]
    assert len(first) == (len(prompt) if window == 0 else window)
    full = prompt + state.output
    start = len(prompt) - len(first)
    for context in seen:  # one window start for the whole sequence: each view is the text from it on
        assert context == full[start:start + len(context)]
    assert inner.cache.length <= len(full) - start


def test_a_new_sequence_chooses_its_window_again(models):
    target, draft = models
    inner = SortedDrafter(draft, SortedConfig((1, 2, 3), (0.05, 0.05, 0.0)))
    hybrid = HybridDrafter(inner, HybridConfig(cost_aware=False, draft_window=8))
    engine = Engine(target, hybrid, 4, eos_token_ids=())
    starts = []
    for prompt in ([7, 3, 9, 7, 3, 1, 12, 40, 41, 42] * 2, list(range(50, 80))):
        expected = Engine(target, eos_token_ids=()).generate(prompt, SamplingParams(), 12).output
        assert engine.generate(prompt, SamplingParams(), 12).output == expected
        starts.append(hybrid._window_start)
    assert starts[0] >= 20 - 8  # its first model step came after some lookup steps, or at the start
    assert starts[1] == 30 - 8  # 30 tokens with no repeat: the model drafts the first step, from the last 8 on


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_a_bad_draft_window_is_refused(bad):
    from s2d.drafting import DraftOptions

    with pytest.raises(ValueError, match="draft_window"):
        HybridConfig(draft_window=bad)
    with pytest.raises(ValueError, match="draft_window"):
        DraftOptions(draft_window=bad)
