"""S2D: the confidence cascade is lossless, lazy catch-up equals recomputation, targets stay separate."""

from __future__ import annotations

import pytest
import torch

from s2d.drafting import DraftOptions, SortedConfig, SortedDrafter, build_drafter
from s2d.drafting.model import ModelDrafter
from s2d.engine import Engine, MultiTargetEngine
from s2d.model.loading import load_model
from s2d.model.tiny import write_random_checkpoint
from s2d.sampling import SamplingParams
from stats import exact_two_tokens, total_variation
from tinymodels import small_vocab_model

PROMPT = [7, 3, 9, 7, 3, 1, 12, 40, 41, 42]


@pytest.fixture(scope="module")
def sorted_draft(sorted_draft_dir):
    return load_model(sorted_draft_dir, dtype="float32")


@pytest.fixture(scope="module")
def target(checkpoints):
    return load_model(checkpoints["target"], dtype="float32")


def plain(target, prompt, n=40):
    return Engine(target, eos_token_ids=()).generate(prompt, SamplingParams(), n).output


@pytest.mark.parametrize("seed", range(4))
def test_greedy_s2d_equals_plain_decoding_with_random_thresholds(target, sorted_draft, seed):
    g = torch.Generator().manual_seed(seed)
    thresholds = tuple(torch.rand(2, generator=g).mul(0.08).add(0.04).tolist()) + (0.0,)
    config = SortedConfig((1, 2, 3), thresholds, stop_threshold=float(torch.rand(1, generator=g)) * 0.05)
    exits_used: set[int] = set()
    for k in (1, 3, 6):
        drafter = SortedDrafter(sorted_draft, config)
        state = Engine(target, drafter, k, eos_token_ids=()).generate(PROMPT, SamplingParams(), 40)
        assert state.output == plain(target, PROMPT)
        exits_used |= set(state.stats.exit_counts)
    assert sorted_draft.cfg.exits == (1, 2, 3)
    assert len(exits_used) >= 2, exits_used  # the cascade really mixed exits


def test_thresholds_steer_the_exit(target, sorted_draft):
    for thresholds, expected in (((0.0, 0.0, 0.0), {1}), ((1.0, 1.0, 0.0), {3})):
        drafter = SortedDrafter(sorted_draft, SortedConfig((1, 2, 3), thresholds))
        state = Engine(target, drafter, 4, eos_token_ids=()).generate(PROMPT, SamplingParams(), 20)
        assert set(state.stats.exit_counts) == expected


def test_lazy_catch_up_equals_full_recomputation(sorted_draft):
    drafter = SortedDrafter(sorted_draft, SortedConfig((1, 2, 3), (0.06, 0.1, 0.0)))
    context = list(PROMPT)
    exits = []
    lagged = 0
    for _ in range(10):  # propose, accept a prefix, append a different token: mixed exits and rollbacks
        draft = drafter.propose(context, 4, SamplingParams(), None)
        exits += draft.exits
        lagged += drafter.cache.lengths[0] > drafter.cache.lengths[-1]  # deep layers behind shallow ones
        context += draft.tokens[: max(1, len(draft) // 2)].tolist() + [99]
    assert len(set(exits)) >= 2 and lagged
    drafter.propose(context, 3, SamplingParams(), None)
    drafter.catch_up()
    n = drafter.cache.lengths[0]
    assert drafter.cache.lengths == [n] * 3
    full = sorted_draft.new_cache()
    ids = torch.tensor([drafter.cached])
    hidden = sorted_draft.run_layers(sorted_draft.embed_tokens(ids), torch.arange(n), full)
    torch.testing.assert_close(drafter.cache.k[:, :, :, :n], full.k[:, :, :, :n], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(drafter.cache.v[:, :, :, :n], full.v[:, :, :, :n], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(drafter.hidden[:n], hidden[0], atol=1e-5, rtol=1e-4)


def test_single_exit_agrees_with_the_reference_model_drafter(sorted_draft):
    """The sorted drafter with only its last exit is the fast path of the plain ModelDrafter."""
    params = SamplingParams(temperature=0.9, top_k=50)
    fast = SortedDrafter(sorted_draft, SortedConfig((3,), (0.0,)))
    reference = ModelDrafter(sorted_draft)
    context = list(PROMPT)
    for step in range(4):
        a = fast.propose(context, 5, params, torch.Generator().manual_seed(step))
        b = reference.propose(context, 5, params, torch.Generator().manual_seed(step))
        assert a.tokens.tolist() == b.tokens.tolist()
        torch.testing.assert_close(a.probs, b.probs, atol=1e-5, rtol=1e-4)
        context += a.tokens[:2].tolist() + [5]


def test_multi_target_engine_keeps_targets_apart(tmp_path, checkpoints, sorted_draft):
    other = load_model(write_random_checkpoint(tmp_path / "t2", num_layers=2, seed=9), dtype="float32")
    targets = {"a": load_model(checkpoints["target"], dtype="float32"), "b": other}
    multi = MultiTargetEngine(targets, sorted_draft, "s2d-softmax",
                              DraftOptions(num_draft_tokens=2, schedule="heuristic", exit_thresholds=(0.1, 0.1, 0)))
    assert multi.engines["a"].drafter.model is multi.engines["b"].drafter.model  # one draft in memory
    out_a = multi.generate("a", PROMPT, SamplingParams(), 30).output
    length_a = multi.engines["a"].drafter.length.current
    assert multi.engines["b"].drafter.length.current == 2  # untouched by a's feedback
    out_b = multi.generate("b", PROMPT, SamplingParams(), 30).output
    assert out_a == plain(targets["a"], PROMPT, 30) and out_b == plain(other, PROMPT, 30)
    assert multi.engines["a"].drafter.length.current == length_a
    assert multi.totals["a"].new_tokens == 30 and multi.totals["b"].new_tokens == 30
    with pytest.raises(KeyError, match="unknown target 'c'"):
        multi.generate("c", PROMPT)


@pytest.mark.parametrize("method", ["sd-exit-1", "sd-exit-2"])
def test_fixed_exit_method(target, sorted_draft, method):
    drafter = build_drafter(method, sorted_draft)
    state = Engine(target, drafter, 4, eos_token_ids=()).generate(PROMPT, SamplingParams(), 30)
    assert state.output == plain(target, PROMPT, 30)
    assert set(state.stats.exit_counts) == {int(method[-1])}


def test_bad_configs_are_refused(sorted_draft):
    with pytest.raises(ValueError, match="ascending"):
        SortedConfig((2, 1))
    with pytest.raises(ValueError, match="thresholds"):
        SortedConfig((1, 2), (0.5,))
    with pytest.raises(ValueError, match="beyond"):
        SortedDrafter(sorted_draft, SortedConfig((1, 4)))
    with pytest.raises(ValueError, match="unknown method"):
        build_drafter("sd-exit", sorted_draft)
    with pytest.raises(ValueError, match="has 3 layers"):
        build_drafter("sd-exit-7", sorted_draft)


def test_sampled_s2d_output_is_distributed_like_the_target():
    target = small_vocab_model(2, seed=1)
    draft = small_vocab_model(3, seed=2, exits=(1, 2, 3))
    prompt = [1, 2, 3]
    p1, exact = exact_two_tokens(target, prompt)  # exact P(x1 | prompt) and P(x1, x2 | prompt) of the target
    drafter = SortedDrafter(draft, SortedConfig((1, 2, 3), (0.85, 0.9, 0.0)))
    engine = Engine(target, drafter, 3, eos_token_ids=())
    n = 4000
    counts = torch.zeros(64)
    exits = set()
    for i in range(n):
        state = engine.generate(prompt, SamplingParams(temperature=1.0, seed=i), 3)
        counts[state.output[0] * 8 + state.output[1]] += 1
        exits |= set(state.stats.exit_counts)
    assert len(exits) >= 2
    tv = total_variation(counts, exact)
    # Reference: the draft's own first-exit distribution, what an unverified draft would give.
    with torch.no_grad():
        cache = draft.new_cache()
        h = draft.run_layers(draft.embed_tokens(torch.tensor([prompt])), torch.arange(3), cache, 0, 1)
        q1 = draft.logits(h[0, -1]).softmax(-1)
    reference = 0.5 * float((q1 - p1).abs().sum())
    assert tv < 0.06, tv  # ~0.04 expected from 4000 samples over 64 cells
    assert tv < reference
