"""s2d-refine: the n-gram models, the refined drafter's exactness (greedy and sampled), calibration, files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from s2d.drafting import DraftOptions, build_drafter, default_options, parse_method
from s2d.drafting.hybrid import HybridDrafter
from s2d.drafting.refine import (NGRAM_FILE, REFINE_FILE, ContextNgram, CorpusNgram, RefinedDrafter, RefineTable,
                                 RefineWeights, load_corpus_ngram)
from s2d.drafting.sorted import SortedConfig, SortedDrafter
from s2d.drafting.steer import target_fingerprint
from s2d.engine import Engine, MultiTargetEngine
from s2d.model.config import CheckpointError
from s2d.model.loading import load_model
from s2d.model.tiny import write_random_checkpoint
from s2d.sampling import SamplingParams
from s2d.train.refine import Positions, accepted, calibrate_refine, grid_search
from stats import chi2_critical, exact_two_tokens, lumped_chi2, pearson_chi2
from tinymodels import small_vocab_model

TEXT = "def add(a, b):\n    return a + b\n\n" * 30 + "for i in range(10):\n    print(i)\n" * 30


@pytest.fixture(scope="module")
def family(tmp_path_factory, small_target_dir, sorted_draft_dir):
    """A tiny target and a 3-exit draft (byte tokenizer) with an n-gram file of TEXT beside the draft."""
    root = tmp_path_factory.mktemp("refine")
    target = small_target_dir
    draft = Path(shutil.copytree(sorted_draft_dir, root / "draft"))  # a copy: the n-gram file is written beside it
    stream = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int64)
    CorpusNgram.build(stream, 257, min_count=1).save(draft / NGRAM_FILE)
    return {"target": target, "draft": draft, "root": root}


def test_ngram_models_are_distributions_and_round_trip(tmp_path):
    """Unpruned, both models' P(. | history) sum to 1; a saved file loads to the same model."""
    rng = np.random.default_rng(0)
    v = 20
    stream = rng.integers(0, v, 3000) // rng.integers(1, 4, 3000)  # skewed, so n-grams repeat
    model = CorpusNgram.build(stream, v, min_count=1)
    everything = np.arange(v)
    for history in ([], [3], [1, 2], [19, 19]):
        assert math.isclose(np.exp(model.logprob(history, everything)).sum(), 1.0, rel_tol=1e-9)
    ctx = ContextNgram(v)
    ctx.sync(stream[:200].tolist())
    for history in ([], [0], stream[198:200].tolist()):
        assert math.isclose(np.exp(ctx.logprob(history, list(range(v)))).sum(), 1.0, rel_tol=1e-9)
    ctx.sync([5, 5, 5])  # a different sequence: recounted, not extended
    assert ctx.tokens == [5, 5, 5] and ctx.bi == {5: {5: 2}}
    pruned = CorpusNgram.build(stream, v, min_count=3)
    assert pruned.tri_keys.size < model.tri_keys.size
    path = pruned.save(tmp_path / NGRAM_FILE, {"note": "test"})
    loaded = load_corpus_ngram(tmp_path, v)
    for name in ("uni", "bi_keys", "bi_counts", "tri_keys", "tri_counts", "ctx_keys", "ctx_total", "ctx_types"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(pruned, name))
    np.testing.assert_array_equal(loaded.logprob([1, 2], everything), pruned.logprob([1, 2], everything))
    assert np.isfinite(loaded.logprob([1, 2], everything)).all() and path.name == NGRAM_FILE


def test_malformed_ngram_and_calibration_files_are_refused(tmp_path):
    path = tmp_path / NGRAM_FILE
    path.write_bytes(b"not an npz file")
    with pytest.raises(CheckpointError, match=NGRAM_FILE):
        CorpusNgram.load(path, 20)
    CorpusNgram.build(np.arange(100) % 20, 20).save(path)
    with pytest.raises(CheckpointError, match="vocabulary of 20"):
        CorpusNgram.load(path, 30)
    arrays = dict(np.load(path))
    arrays["tri_keys"] = arrays["tri_keys"][::-1].copy()
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="ascending"):
        CorpusNgram.load(path, 20)
    (tmp_path / REFINE_FILE).write_text('{"targets": {"x": {"exits": {"2": {"alone": {"weights": {"w_ctx": -1}}}}}}}')
    with pytest.raises(CheckpointError, match=REFINE_FILE):
        RefineTable.load(tmp_path)


def test_method_names_and_defaults(family, tmp_path):
    assert parse_method("refine-exit-2").model == "refine-exit-2"
    assert parse_method("lookup+refine-exit-1").lookup and parse_method("s2d-refine").lookup
    assert default_options("s2d-refine") == default_options("s2d")
    draft = load_model(family["draft"], dtype="float32")
    refined = build_drafter("s2d-refine", draft, default_options("s2d-refine", draft))
    assert isinstance(refined, HybridDrafter) and isinstance(refined.inner, RefinedDrafter)
    assert refined.inner.exit_layers == 2  # the s2d default's exit: the middle one
    bare = write_random_checkpoint(tmp_path / "bare", num_layers=2, hidden_size=32, s2d_exits=[1, 2])
    with pytest.raises(ValueError, match="--objective ngram"):
        build_drafter("refine-exit-1", load_model(bare, dtype="float32"))


def test_zero_weights_reproduce_the_plain_exit(family):
    draft = load_model(family["draft"], dtype="float32")
    corpus = load_corpus_ngram(family["draft"], 257)
    for exit_layers, vocab in ((1, None), (2, list(range(60, 200)))):
        plain = SortedDrafter(draft, SortedConfig((exit_layers,), (0.0,)), vocab=vocab)
        refined = RefinedDrafter(draft, exit_layers, corpus, vocab=vocab, weights=RefineWeights(0.0, 0.0, 8))
        for seed in range(4):
            context = torch.randint(0, 257, (15,), generator=torch.Generator().manual_seed(seed)).tolist()
            assert (refined.propose(context, 6, SamplingParams(), None).tokens.tolist()
                    == plain.propose(context, 6, SamplingParams(), None).tokens.tolist())
    # with weight on the n-grams, the chain follows the text the n-grams were counted on
    context = list(b"def add(a, b):\n    ret")
    strong = RefinedDrafter(draft, 1, corpus, weights=RefineWeights(0.0, 5.0, 257))  # every token a candidate
    assert bytes(strong.propose(context, 4, SamplingParams(), None).tokens.tolist()) == b"urn "


@pytest.mark.parametrize("method", ["refine-exit-1", "lookup+refine-exit-3", "s2d-refine"])
def test_greedy_refined_output_equals_plain_decoding(family, method):
    target = load_model(family["target"], dtype="float32")
    draft = load_model(family["draft"], dtype="float32")
    prompt = list(b"for i in range(10):\n    print(i)\nfor i in")
    plain = MultiTargetEngine({"t": target}, None, "ar", eos_token_ids=()).generate("t", prompt, SamplingParams(), 40)
    options = DraftOptions(num_draft_tokens=4) if method != "s2d-refine" else default_options(method, draft)
    drafter = build_drafter(method, draft, options)
    drafter_model = drafter.inner if isinstance(drafter, HybridDrafter) else drafter
    drafter_model.fixed = drafter_model.weights = RefineWeights(1.0, 1.0, 8)  # weights that change choices
    state = Engine(target, drafter, 8, eos_token_ids=()).generate(prompt, SamplingParams(), 40)
    assert state.output == plain.output
    assert state.stats.proposed > 0


def test_sampled_q_is_the_distribution_drawn_from():
    """The first drafted token follows the returned q' exactly (chi-squared), and q' lives on the top-k."""
    draft = small_vocab_model(3, seed=5, exits=(1, 2, 3), head_scale=2.0)
    corpus = CorpusNgram.build(np.random.default_rng(1).integers(0, 8, 400) // 2, 8, min_count=1)
    drafter = RefinedDrafter(draft, 2, corpus, weights=RefineWeights(1.0, 2.0, 5))
    context = [1, 2, 3, 1, 2]
    params = SamplingParams(temperature=0.8)
    q = drafter.propose(context, 1, params, torch.Generator().manual_seed(0)).probs[0]
    assert int((q > 0).sum()) == 5 and math.isclose(float(q.sum()), 1.0, rel_tol=1e-5)
    plain = SortedDrafter(draft, SortedConfig((2,), (0.0,))).propose(context, 1, params, None).probs[0]
    assert float((q - plain).abs().sum()) > 0.05  # the n-grams moved it
    n, counts = 4000, torch.zeros(8)
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        counts[int(drafter.propose(context, 1, params, g).tokens[0])] += 1
    keep = q > 0
    assert counts[~keep].sum() == 0
    chi2 = pearson_chi2(counts[keep], q[keep] * n)
    assert chi2 < chi2_critical(int(keep.sum()) - 1), chi2


def test_sampled_output_is_distributed_like_the_target():
    """Two sampled tokens through a refined draft (top-3, so q' misses tokens p has) follow the target exactly."""
    target = small_vocab_model(2, seed=3, head_scale=4.0)
    draft = small_vocab_model(3, seed=4, exits=(1, 2, 3), head_scale=4.0)
    corpus = CorpusNgram.build(np.random.default_rng(2).integers(0, 8, 400), 8, min_count=1)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    _, exact = exact_two_tokens(target, prompt)  # exact P(x1, x2 | prompt) of the target
    drafter = RefinedDrafter(draft, 2, corpus, weights=RefineWeights(1.0, 1.0, 3))
    engine = Engine(target, drafter, 3, eos_token_ids=())
    n = 3000
    counts = torch.zeros(64)
    for i in range(n):
        out = engine.generate(prompt, SamplingParams(temperature=1.0, seed=i), 2).output
        counts[out[0] * 8 + out[1]] += 1
    stat, df = lumped_chi2(counts, exact * n)
    assert stat < chi2_critical(df), stat


def test_grid_search_measures_chains_and_prefers_what_helps():
    # 6 positions of one continuation; the draft's best candidate is wrong where the n-gram term knows better
    ids = np.array([[1, 2]] * 6)
    logq = np.log(np.array([[0.6, 0.4]] * 6))
    lp_corpus = np.log(np.array([[0.1, 0.9], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.9, 0.1], [0.9, 0.1]]))
    truth = np.array([2, 1, 2, 2, 1, 1])
    free = np.array([True, False, True, False, False, False])
    pos = Positions(ids, logq, np.zeros_like(logq), lp_corpus, truth, np.zeros(6, np.int64), free)
    assert accepted(pos, RefineWeights(0.0, 0.0, 2), chain=3) == (0.5, (0 + 1 + 0 + 0 + 2 + 1) / 6)
    assert accepted(pos, RefineWeights(0.0, 1.0, 2), chain=3) == (1.0, (3 + 3 + 3 + 3 + 2 + 1) / 6)
    assert accepted(pos, RefineWeights(0.0, 0.0, 2), chain=3, behind_lookup=True) == (0.0, 0.0)  # at 0 and 2 only
    assert accepted(pos, RefineWeights(0.0, 1.0, 2), chain=3, behind_lookup=True) == (1.0, 3.0)
    best, table = grid_search([pos])
    assert best.w_corpus > 0 and best.w_ctx == 0.0 and len(table) > 10
    split = Positions(*(getattr(pos, f) for f in ("ids", "logq", "lp_ctx", "lp_corpus", "truth")),
                      np.array([0, 0, 0, 1, 1, 1]), free)
    assert accepted(split, RefineWeights(0.0, 1.0, 2), chain=3)[1] == (3 + 2 + 1 + 3 + 2 + 1) / 6  # no chain crosses


def test_calibration_is_stored_per_target_and_bound_by_fingerprint(family, tmp_path):
    from s2d.train.refine import store_calibration

    target = load_model(family["target"], dtype="float32")
    draft = load_model(family["draft"], dtype="float32")
    corpus = load_corpus_ngram(family["draft"], 257)
    prompts = [list(b"def add(a, b):\n    return a + b\n\ndef add("), list(b"for i in range(10):\n    pr")]
    entries, pooled = calibrate_refine(draft, {"t": target}, prompts, corpus, new_tokens=12, progress=False)
    fp = target_fingerprint(target)
    assert entries[fp]["name"] == "t" and set(entries[fp]["exits"]) == {"1", "2", "3"}
    alone, behind = entries[fp]["exits"]["2"]["alone"], entries[fp]["exits"]["2"]["behind_lookup"]
    assert alone["accepted"] >= alone["base_accepted"] and behind["positions"] < alone["positions"]
    store_calibration(tmp_path, entries, pooled, {"note": "test"})
    table = RefineTable.load(tmp_path)
    assert json.loads((tmp_path / REFINE_FILE).read_text())["note"] == "test"
    drafter = RefinedDrafter(draft, 2, corpus, table)
    assert drafter.weights == pooled[2, False]  # before a target is bound: the pooled weights
    drafter.bind_target(target)
    assert drafter.weights == RefineWeights(**alone["weights"])
    drafter.serve(behind_lookup=True)  # as lookup+refine-exit-2 and s2d-refine run it
    assert drafter.weights == RefineWeights(**behind["weights"])


def test_train_draft_objective_ngram_writes_the_file_beside_a_copy(family, tmp_path, capsys):
    from s2d.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "with-ngram"
    assert main(["train-draft", "--objective", "ngram", "--init", str(family["draft"]), "--data", str(corpus),
                 "--out", str(out), "--ngram-min-count", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ngram"]["tokens"] == len(TEXT.encode()) + 1  # the document and its EOS
    loaded = load_corpus_ngram(out, 257)
    assert loaded is not None and (out / "config.json").exists()
    assert main(["train-draft", "--objective", "ngram", "--init", str(family["draft"]), "--data", str(corpus),
                 "--out", str(tmp_path / "x"), "--targets", str(family["target"])]) == 2
    assert "--calibration" in capsys.readouterr().err


def test_sampling_with_greedy_calibrated_weights_drafts_as_the_plain_exit():
    """Stored (greedy-calibrated) weights are not used under sampling: the draft is the plain exit's."""
    draft = small_vocab_model(3, seed=4, exits=(1, 2, 3), head_scale=4.0)
    corpus = CorpusNgram.build(np.random.default_rng(2).integers(0, 8, 400), 8, min_count=1)
    refined = RefinedDrafter(draft, 2, corpus)
    refined.weights = RefineWeights(3.0, 3.0, 3)  # as a table entry would set them (not fixed)
    plain = SortedDrafter(draft, SortedConfig((2,), (0.0,)))
    params, context = SamplingParams(temperature=1.0), [1, 2, 3, 1, 2]
    a = refined.propose(context, 3, params, torch.Generator().manual_seed(0))
    b = plain.propose(context, 3, params, torch.Generator().manual_seed(0))
    assert a.tokens.tolist() == b.tokens.tolist() and torch.allclose(a.probs, b.probs)
