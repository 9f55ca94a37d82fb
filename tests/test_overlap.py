"""Overlapped drafting and verification (s2d-overlap, overlap+M): lossless, reproducible, no leaked threads;
the native runtime's per-call thread counts and concurrent calls."""

from __future__ import annotations

import copy
import itertools
import random
import threading
import time

import pytest
import torch

from s2d.drafting import SortedConfig, SortedDrafter, build_drafter, default_options, \
    engine_draft_tokens
from s2d.drafting import methods
from s2d.drafting.hybrid import HybridDrafter
from s2d.drafting.overlap import OverlapDrafter, OverlapThreads
from s2d.engine import Engine
from s2d.model import native
from s2d.model.loading import load_model
from s2d.sampling import SamplingParams
from stats import chi2_critical, lumped_chi2
from tinymodels import small_vocab_model

TWO = OverlapThreads(target=1, draft=1)  # the 2-core split (conftest runs torch on one thread)


@pytest.fixture(scope="module")
def models(checkpoints, sorted_draft_dir):
    # The session's 3-layer target: these tests have always run a target as deep as the draft.
    return load_model(checkpoints["target"], dtype="float32"), load_model(sorted_draft_dir, dtype="float32")


@pytest.fixture
def two_cores(monkeypatch):
    """build_drafter sees two cores, whatever this machine has (the split is what is tested)."""
    monkeypatch.setattr(methods, "available_cores", lambda: 2)


def engine_for(method: str, target, draft) -> Engine:
    options = default_options(method, draft)
    return Engine(target, build_drafter(method, draft, options), engine_draft_tokens(method, options), ())


def overlap_of(drafter) -> OverlapDrafter:
    return drafter.inner if isinstance(drafter, HybridDrafter) else drafter


PROMPTS = [list(range(60, 80)) * 3, [7, 3, 9, 7, 3, 1, 12, 40, 41, 42]]


@pytest.mark.parametrize("method", ["s2d-overlap", "overlap+sd-exit-2", "overlap+lookup+sd-exit-1"])
def test_greedy_overlap_equals_plain_decoding(models, two_cores, method):
    target, draft = models
    for prompt in PROMPTS:
        expected = Engine(target, eos_token_ids=()).generate(prompt, SamplingParams(), 40).output
        engine = engine_for(method, target, draft)
        assert overlap_of(engine.drafter).overlapped
        assert engine.generate(prompt, SamplingParams(), 40).output == expected


def test_greedy_speculation_is_used_and_equals_plain(models):
    """The target itself as its draft: every block is accepted and every guess is right, so every step after
    the first takes the speculated draft; the output is still plain decoding's."""
    target, _ = models
    prompt = PROMPTS[1]
    expected = Engine(target, eos_token_ids=()).generate(prompt, SamplingParams(), 40).output
    drafter = OverlapDrafter(SortedDrafter(target, SortedConfig((3,))), TWO)
    state = Engine(target, drafter, 3, ()).generate(prompt, SamplingParams(), 40)
    assert state.output == expected
    assert drafter.used >= state.stats.target_passes - 2 and state.stats.mean_accepted_tokens == 4.0


def test_a_speculated_draft_equals_the_sequential_draft(models):
    """Reference: what the overlapped drafter hands out for a context is what its inner drafter drafts
    sequentially for that context (greedy)."""
    _, draft = models
    config = SortedConfig((2,))
    fast, reference = OverlapDrafter(SortedDrafter(draft, config), TWO), SortedDrafter(draft, config)
    context = PROMPTS[1]
    greedy = SamplingParams()
    with torch.inference_mode():
        first = fast.propose(context, 3, greedy, None)
        block = context + first.tokens.tolist()
        with fast.speculate(block, 3, greedy, None):
            pass
        guess = reference.propose(block, 1, greedy, None).tokens.tolist()
        after = block + guess
        got = fast.propose(after, 3, greedy, None)
        assert fast.used == 1
        assert got.tokens.tolist() == reference.propose(after, 3, greedy, None).tokens.tolist()
        # any other context: the speculation is dropped and the draft made as usual
        with fast.speculate(block, 3, greedy, None):
            pass
        other = block + [(guess[0] + 1) % 257]
        assert fast.propose(other, 3, greedy, None).tokens.tolist() == \
            reference.propose(other, 3, greedy, None).tokens.tolist()
        assert fast.used == 1


def test_one_core_runs_sequentially(models, monkeypatch):
    target, draft = models
    monkeypatch.setattr(methods, "available_cores", lambda: 1)
    engine = engine_for("s2d-overlap", target, draft)
    assert not overlap_of(engine.drafter).overlapped
    plain = engine_for("s2d", target, draft)
    params = SamplingParams(temperature=1.0, seed=3)
    assert engine.generate(PROMPTS[1], params, 30).output == plain.generate(PROMPTS[1], params, 30).output


def test_bad_methods_are_refused():
    for name in ("overlap+ar", "overlap+lookup", "overlap+s2d-tree", "overlap+overlap+sd", "overlap+pld"):
        with pytest.raises(ValueError, match="overlap runs a chain method"):
            methods.parse_method(name)
    with pytest.raises(ValueError, match=">= 1"):
        OverlapThreads(0, 1)


def slowed(drafter: OverlapDrafter, seed: int) -> None:
    """Random delays in the speculation's drafting: the output must not depend on timing."""
    rng = random.Random(seed)
    propose = drafter.inner.propose

    def delayed(*args, **kwargs):
        time.sleep(rng.random() * 0.002)
        return propose(*args, **kwargs)

    drafter.inner.propose = delayed


def test_seeded_sampling_is_reproducible_whatever_the_timing(models, two_cores):
    target, draft = models
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    outputs = []
    for run in range(3):
        engine = engine_for("overlap+lookup+sd-exit-2", target, draft)
        if run:
            slowed(overlap_of(engine.drafter), run)
        outputs.append([engine.generate(p, params, 40).output for p in PROMPTS])
    assert outputs[0] == outputs[1] == outputs[2]
    assert overlap_of(engine.drafter).speculations > 0


def test_sampling_overlapped_keeps_the_target_distribution():
    """Four tokens sampled with speculated drafts in play: (x1, x2) and (x3, x4) (drafted in a speculation
    whenever the first block was accepted and guessed right) are distributed as the target's."""
    target = small_vocab_model(2, seed=3, head_scale=4.0)
    draft = copy.deepcopy(target)
    with torch.no_grad():
        draft.lm_head.weight.mul_(0.6)  # q != p, same order of likelihoods: guesses often right
    draft.drop_native()
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    with torch.no_grad():  # exact P(x1..x4 | prompt) by enumeration
        seqs = torch.tensor([prompt + list(s) for s in itertools.product(range(8), repeat=3)])
        logp = target(seqs, torch.arange(11), target.new_cache(batch=512))[:, 7:].float().log_softmax(-1)
        cols = seqs[:, 8:]
        joint3 = logp[:, 0].gather(1, cols[:, :1])[:, 0] + logp[:, 1].gather(1, cols[:, 1:2])[:, 0] \
            + logp[:, 2].gather(1, cols[:, 2:3])[:, 0]  # [512] log P(x1, x2, x3), the first 512 rows
        exact4 = (joint3[:, None] + logp[:, 3]).exp().reshape(8, 8, 8, 8)  # [x1, x2, x3, x4]
    drafter = OverlapDrafter(SortedDrafter(draft, SortedConfig((2,))), TWO)
    engine = Engine(target, drafter, 1, eos_token_ids=())
    n = 3000
    counts = torch.zeros(8, 8, 8, 8)
    for i in range(n):
        out = engine.generate(prompt, SamplingParams(temperature=1.0, seed=i), 4).output
        counts[tuple(out)] += 1
    assert drafter.used > n // 4, drafter.used  # speculated drafts were verified in a good share of runs
    for dims in ((2, 3), (0, 1)):
        exact = exact4.sum(dims).reshape(-1)
        observed = counts.sum(dims).reshape(-1)
        stat, df = lumped_chi2(observed, exact * n)
        assert stat < chi2_critical(df), (dims, stat)


def test_no_thread_outlives_a_step(models, two_cores):
    target, draft = models
    baseline = threading.active_count()
    engine = engine_for("s2d-overlap", target, draft)
    engine.generate(PROMPTS[1], SamplingParams(), 30)
    assert threading.active_count() == baseline
    stream = engine.stream(PROMPTS[1], SamplingParams(temperature=1.0, seed=1), 30)
    next(stream)
    next(stream)
    stream.close()  # a cancelled request
    assert threading.active_count() == baseline
    drafter = overlap_of(engine.drafter)
    with pytest.raises(RuntimeError, match="the pass failed"):
        with drafter.speculate(PROMPTS[1], 3, SamplingParams(), None):
            raise RuntimeError("the pass failed")
    assert threading.active_count() == baseline


needs_native = pytest.mark.skipif(native.library() is None, reason="the native runtime does not run here")


@needs_native
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_results_do_not_depend_on_the_thread_count(models, dtype):
    """1 thread and 2 threads: bit-identical hidden states, logits, argmax and top-1 (token and probability)."""
    target = load_model(models[0].checkpoint_dir, dtype=dtype)
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(0))
    results = {}
    for n in (1, 2):
        with torch.inference_mode(), native.threads(n):
            cache = target.new_cache()
            target.run_layers(target.embed_tokens(ids[:, :30]), torch.arange(30), cache)
            hidden = target.run_layers(target.embed_tokens(ids[:, 30:]), torch.arange(30, 40), cache)[0]
            results[n] = (hidden, target.logits(hidden), target.greedy(ids[:, 30:31], torch.tensor([40]), cache),
                          [target.top1(h) for h in hidden])
    one, two = results[1], results[2]
    for a, b in zip(one[:3], two[:3]):
        assert torch.equal(a, b)
    assert one[3] == two[3]


@needs_native
def test_native_calls_on_two_models_run_concurrently_and_agree(models):
    """Two Python threads, one model each, passes at the same time: the results of sequential calls."""
    target, draft = (load_model(m.checkpoint_dir, dtype="bfloat16") for m in models)
    ids = torch.randint(0, 257, (1, 48), generator=torch.Generator().manual_seed(1))

    def passes(model) -> list[torch.Tensor]:
        with torch.inference_mode(), native.threads(1):
            cache, out = model.new_cache(), []
            for t in range(48):
                out.append(model.logits(model.run_layers(model.embed_tokens(ids[:, t:t + 1]), torch.tensor([t]),
                                                         cache)[0, -1]))
            return out

    expected = {id(m): passes(m) for m in (target, draft)}
    got: dict[int, list[torch.Tensor]] = {}
    workers = [threading.Thread(target=lambda m=m: got.__setitem__(id(m), passes(m))) for m in (target, draft)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for key, rows in expected.items():
        assert all(torch.equal(a, b) for a, b in zip(rows, got[key]))


def test_thread_counts_are_checked():
    with pytest.raises(ValueError, match="thread count"):
        with native.threads(-1):
            pass
