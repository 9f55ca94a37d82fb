"""Batched speculative decoding (issue 26, part 2): several sequences of one target verified in one pass per
step; each sequence's output is the one it gets decoded alone, for every kind of drafter."""

from __future__ import annotations

import pytest
import torch
from clitools import benchmark_module
from stats import chi2_critical, exact_two_tokens, lumped_chi2
from tinymodels import small_vocab_model

from s2d.drafting import SortedConfig, SortedDrafter, build_drafter, default_options
from s2d.engine import Engine, EngineBusyError, MultiTargetEngine
from s2d.sampling import SamplingParams

# Prompts of different lengths (one crossing the attention's 256-key chunk) and different output lengths.
PROMPTS = [list(range(40, 70)), [7, 3, 9, 7, 3, 1, 12, 40, 41, 42] * 3, list(range(1, 200)) + list(range(5, 70)),
           [99, 98, 97]]
MAX_NEW = [30, 24, 12, 40]
METHODS = ["ar", "sd-exit-1", "lookup", "s2d", "s2d-tree", "rsd", "lookup+rsd"]


@pytest.fixture(scope="module")
def family(target_and_draft):
    return target_and_draft


def alone(target, draft, method, prompt, params, max_new, eos=()):
    engine = MultiTargetEngine({"t": target}, draft, method, eos_token_ids=eos)
    return engine.generate("t", prompt, params, max_new)


@pytest.mark.parametrize("method", METHODS)
def test_batched_greedy_equals_each_alone(family, method):
    target, draft = family
    expected = [alone(target, draft, method, p, SamplingParams(), n).output for p, n in zip(PROMPTS, MAX_NEW)]
    engine = MultiTargetEngine({"t": target}, draft, method, eos_token_ids=())
    states = engine.generate_batch("t", PROMPTS, SamplingParams(), MAX_NEW)
    assert [s.output for s in states] == expected
    assert all(s.finished for s in states)
    assert engine.totals["t"].new_tokens == sum(MAX_NEW)


def test_a_sequence_ends_at_eos_while_the_others_go_on(family):
    target, draft = family
    plain = alone(target, draft, "s2d", PROMPTS[0], SamplingParams(), 30).output
    eos = (plain[6],)  # sequence 0 stops early; the others stop wherever this token comes, or at their limit
    expected = [alone(target, draft, "s2d", p, SamplingParams(), n, eos).output for p, n in zip(PROMPTS, MAX_NEW)]
    engine = MultiTargetEngine({"t": target}, draft, "s2d", eos_token_ids=eos)
    got = [s.output for s in engine.generate_batch("t", PROMPTS, SamplingParams(), MAX_NEW)]
    assert got == expected and len(got[0]) <= 7 < MAX_NEW[0]


@pytest.mark.parametrize("method", ["ar", "sd-exit-2", "s2d", "rsd"])
def test_seeded_sampling_in_a_batch_equals_the_same_request_alone(family, method):
    target, draft = family
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=i) for i in range(len(PROMPTS))]
    expected = [alone(target, draft, method, p, q, n).output for p, q, n in zip(PROMPTS, params, MAX_NEW)]
    engine = MultiTargetEngine({"t": target}, draft, method, eos_token_ids=())
    assert [s.output for s in engine.generate_batch("t", PROMPTS, params, MAX_NEW)] == expected


@pytest.mark.parametrize("method", ["s2d", "lookup+s2d-tree"])
def test_a_seeded_request_draws_the_same_whatever_the_engine_decoded_before(family, method):
    """The cost-aware switch of s2d keeps running means across requests; a seeded sampled request forgets
    them first, so a server answers it as a fresh ``s2d generate --seed`` does."""
    target, draft = family
    q = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    fresh = alone(target, draft, method, PROMPTS[0], q, 30).output
    engine = MultiTargetEngine({"t": target}, draft, method, eos_token_ids=())
    engine.generate("t", PROMPTS[1], SamplingParams(temperature=1.0, seed=9), 40)
    engine.generate("t", PROMPTS[3], SamplingParams(), 40)
    assert engine.generate("t", PROMPTS[0], q, 30).output == fresh


def test_more_rows_than_one_pass_takes(family):
    """20 sequences drafting up to 13 tokens each: the step verifies them in several passes of <= 64 rows."""
    target, draft = family
    prompts = [[(7 * i + j) % 200 + 1 for j in range(12 + i)] * 2 for i in range(20)]
    expected = [alone(target, draft, "lookup", p, SamplingParams(), 16).output for p in prompts]
    engine = MultiTargetEngine({"t": target}, draft, "lookup", eos_token_ids=())
    assert [s.output for s in engine.generate_batch("t", prompts, SamplingParams(), 16)] == expected


def test_the_pass_cost_times_attention_apart_on_the_runtime(family):
    """Batched passes on the native runtime feed goodput's cost model their attention time per cached key (the
    runtime's profile); on torch the whole pass goes on the line in rows."""
    from s2d.goodput import pass_cost
    from s2d.model import native

    target, draft = family
    engine = MultiTargetEngine({"t": target}, draft, "s2d", eos_token_ids=())
    cost = pass_cost(target)
    cost.seconds.clear()
    cost.per_key.clear()
    target.use_native = native.library() is not None
    try:
        engine.generate_batch("t", PROMPTS, SamplingParams(), MAX_NEW)
        timed = dict(cost.per_key)
        cost.per_key.clear()
        target.use_native = False
        engine.generate_batch("t", PROMPTS, SamplingParams(), MAX_NEW)
    finally:
        target.use_native = True
    assert cost.seconds and not cost.per_key
    if native.library() is not None:
        assert timed and all(v > 0 for v in timed.values())


def test_streaming_a_batch_and_refusals(family):
    target, draft = family
    options = default_options("sd-exit-1", draft)
    drafters = [build_drafter("sd-exit-1", draft, options, target) for _ in PROMPTS[:2]]
    engine = Engine(target, drafters[0], 4, eos_token_ids=())
    steps = list(engine.stream_batch(PROMPTS[:2], SamplingParams(), [5, 9], drafters))
    assert [sum(len(s[i]) for s in steps) for i in range(2)] == [5, 9]
    assert steps[-1][0] == []  # the shorter one finished earlier
    with pytest.raises(ValueError, match="drafter of its own"):
        engine.generate_batch(PROMPTS[:2], SamplingParams(), 5)
    with pytest.raises(ValueError, match="share one drafter"):
        engine.generate_batch(PROMPTS[:2], SamplingParams(), 5, [drafters[0], drafters[0]])
    with pytest.raises(Exception, match="prompt 1 of the batch"):
        engine.generate_batch([PROMPTS[0], []], SamplingParams(), 5, drafters)
    stream = engine.stream_batch(PROMPTS[:2], SamplingParams(), 9, drafters)
    next(stream)
    with pytest.raises(EngineBusyError):
        engine.generate(PROMPTS[0], SamplingParams(), 4)
    stream.close()
    assert engine.generate(PROMPTS[0], SamplingParams(), 4).output  # free again


class WrongQ(SortedDrafter):
    """Samples its tokens from the exit's q but reports a flatter one: verification then accepts too often."""

    def propose(self, context, max_tokens, params, generator):
        draft = super().propose(context, max_tokens, params, generator)
        if draft.probs is not None:
            draft.probs = 0.5 * draft.probs + 0.5 / draft.probs.shape[-1]
        return draft


@pytest.mark.parametrize("drafter_class, lossless", [(SortedDrafter, True), (WrongQ, False)])
def test_the_batched_sampler_keeps_the_targets_distribution(drafter_class, lossless):
    """Two sampled tokens from 64-sequence batches follow the target's exact law (chi-squared at p=0.001);
    the negative control, a drafter that misreports its q, is rejected by the same test."""
    target = small_vocab_model(2, seed=1)
    draft = small_vocab_model(3, seed=2, exits=(1, 2, 3))
    prompt = [1, 2, 3]
    _, exact = exact_two_tokens(target, prompt)
    drafters = [drafter_class(draft, SortedConfig((1, 2, 3), (0.85, 0.9, 0.0))) for _ in range(64)]
    engine = Engine(target, drafters[0], 3, eos_token_ids=())
    counts = torch.zeros(64)
    for batch in range(40):
        params = [SamplingParams(temperature=1.0, seed=64 * batch + i) for i in range(64)]
        for state in engine.generate_batch([prompt] * 64, params, 2, drafters):
            counts[state.output[0] * 8 + state.output[1]] += 1
    stat, df = lumped_chi2(counts, exact * counts.sum())
    assert (stat < chi2_critical(df)) == lossless, (stat, chi2_critical(df))


def test_policies_interleaved_step_by_step(family):
    """benchmarks/batch_goodput.py --interleave: a batch's steps take the policies in turn, each step's tokens
    counted for its own policy, and the outputs are still those decoded alone."""
    bench = benchmark_module("batch_goodput")
    target, draft = family
    expected = [alone(target, draft, "s2d", p, SamplingParams(), 40).output for p in PROMPTS]
    multi = MultiTargetEngine({"t": target}, draft, "s2d", eos_token_ids=())
    row = bench.interleaved(multi, PROMPTS, expected, ["cap0", "cap2", "goodput"], 40)
    assert row["identical_to_alone"] == len(PROMPTS)
    steps = [row[p]["steps"] for p in ("cap0", "cap2", "goodput")]
    assert min(steps) >= 1 and max(steps) - min(steps) <= 1  # in turn
    assert row["cap0"]["tokens"] <= len(PROMPTS) * row["cap0"]["steps"]  # no draft: one token a sequence a step
