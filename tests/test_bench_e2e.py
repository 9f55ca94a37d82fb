"""A tiny end-to-end ``s2d bench`` run on random models: every output written, peers included."""

from __future__ import annotations

import json

import pytest

from s2d.bench.metrics import ALL
from s2d.bench.results import read_results
from s2d.cli import main
from s2d.model.tiny import write_random_checkpoint


@pytest.fixture(scope="module")
def sorted_draft(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("sorted") / "draft", hidden_size=32, num_layers=2,
                                   num_heads=2, num_kv_heads=1, intermediate_size=64, seed=3, s2d_exits=[1, 2])


@pytest.fixture
def questions(tmp_path):
    rows = [
        {"question_id": 1, "category": "code", "turns": ["def add(a, b):\n    return a + b\n\ndef add3("]},
        {"question_id": 2, "category": "chat", "turns": ["abcabcabc", "again: abc"]},
        {"question_id": 3, "category": "code", "turns": ["import os\nimport sys\nimport "]},
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bench(*argv):
    return main(["bench", *map(str, argv)])


def test_end_to_end_writes_every_output(tmp_path, checkpoints, sorted_draft, questions, capsys):
    out = tmp_path / "out"
    methods = "pld,ar,sd,sd-exit-1,s2d,hf-ar,hf-assisted,hf-pld"
    code = bench("--target", checkpoints["target"], "--target", sorted_draft, "--draft", sorted_draft,
                 "--methods", methods, "--questions", questions, "--max-new-tokens", 12, "--dtype", "float32",
                 "--warmup", 1, "--repeats", 2, "--out", out, "--no-progress")
    assert code == 0
    for name in ("results.json", "records.jsonl", "report.md", "mat_vs_speedup.png", "tokens_per_s.png"):
        assert (out / name).stat().st_size > 0, name
    doc = read_results(out)  # validates the schema
    target = checkpoints["target"].name
    assert (out / f"speedup_{target}.png").exists()
    runs = {(r["target"], r["method"], r["category"]): r for r in doc["runs"]}
    # On the target: every method, both categories and the overall row.
    for m in methods.split(","):
        for c in ("code", "chat", ALL):
            assert (target, m, c) in runs, (m, c)
    assert runs[(target, "ar", "code")]["num_questions"] == 2 and runs[(target, "ar", "chat")]["num_turns"] == 2
    # float32 greedy: our speculative methods are lossless against ar.
    for m in ("sd", "pld", "sd-exit-1", "s2d"):
        assert runs[(target, m, ALL)]["greedy_identical"] == 1.0, m
    exits = runs[(target, "s2d", ALL)]["exit_histogram"]
    assert exits and set(exits) <= {"0", "1", "2"} and sum(exits.values()) > 0  # 0: lookup tokens
    assert runs[(target, "ar", ALL)]["mean_accepted_tokens"] == pytest.approx(1.0)
    assert runs[(target, "hf-ar", ALL)]["mean_accepted_tokens"] == pytest.approx(1.0)  # prefill pass = 1st token
    assert runs[(target, "hf-assisted", ALL)]["mean_accepted_tokens"] >= 1.0
    assert runs[(target, "sd", ALL)]["acceptance_by_position"]
    assert runs[(target, "ar", ALL)]["speedup"] == pytest.approx(1.0)
    # The draft as a target: draft methods are skipped (drafting with itself measures nothing), others run.
    draft_name = sorted_draft.name
    skipped = {(s["target"], s["method"]) for s in doc["skipped"]}
    assert skipped == {(draft_name, m) for m in ("sd", "sd-exit-1", "s2d", "hf-assisted")}
    assert (draft_name, "pld", ALL) in runs and (draft_name, "sd", ALL) not in runs
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    multi = [r for r in records if r["question_id"] == 2]
    assert multi and all(len(r["turns"]) == 2 for r in multi)
    assert all(0 < len(t["tokens"]) <= 12 for r in records for t in r["turns"])
    report = (out / "report.md").read_text()
    assert "## Overall" in report and "hf-assisted" in report and "## Skipped" in report and "## Exits" in report
    assert "![mat_vs_speedup](mat_vs_speedup.png)" in report
    stdout = capsys.readouterr().out
    assert "speedup" in stdout

    # The report re-renders from results.json alone.
    (out / "report.md").unlink()
    assert main(["bench", "report", str(out)]) == 0
    assert (out / "report.md").read_text() == report


def test_bad_requests_get_clear_errors(tmp_path, checkpoints, questions, capsys):
    common = ["--target", checkpoints["target"], "--questions", questions, "--out", tmp_path / "o", "--no-progress"]
    cases = [
        (["--methods", "ar,sd", *common], "needs a draft model"),
        (["--methods", "ar,nope", *common], "unknown method 'nope'"),
        (["--methods", "ar", "--categories", "poetry", *common], "unknown category poetry"),
        (["--methods", "ar", "--target", checkpoints["target"], "--questions", tmp_path / "none.jsonl",
          "--out", tmp_path / "o"], "not found"),
        (["--methods", "ar", "--questions", questions], "missing --target, --out"),
        (["--methods", "sd-exit-9", "--draft", checkpoints["draft"], *common], "the draft has 1 layer (exits 1..1)"),
        (["--methods", "ar", "--target", tmp_path / "no-such-model", *common], "no-such-model"),
    ]
    for argv, message in cases:
        assert bench(*argv) == 2, argv
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "o" / "results.json").exists()


def test_tree_methods_in_the_bench(tmp_path, checkpoints, sorted_draft, questions):
    """s2d-tree, rsd and rsd-sbs run in the bench with a --tree shape, identical to ar under greedy."""
    out = tmp_path / "trees"
    assert bench("--target", checkpoints["target"], "--draft", sorted_draft, "--methods", "ar,s2d-tree,rsd,rsd-sbs",
                 "--tree", "2,3,6", "--questions", questions, "--max-new-tokens", 12, "--dtype", "float32",
                 "--warmup", 0, "--out", out, "--no-progress") == 0
    doc = read_results(out)
    rows = {r["method"]: r for r in doc["runs"] if r["category"] == "all"}
    assert all(rows[m]["greedy_identical"] == 1.0 for m in ("s2d-tree", "rsd", "rsd-sbs"))
    assert "trees 2,3,6" in (out / "report.md").read_text()


def test_bad_tree_shape_is_refused(tmp_path, checkpoints, questions, capsys):
    with pytest.raises(SystemExit):
        bench("--target", checkpoints["target"], "--methods", "ar", "--tree", "2,6,99", "--questions", questions,
              "--out", tmp_path / "o")
    assert "tree nodes must be <= 63" in capsys.readouterr().err


def test_calibrated_s2d_method_reads_the_stored_calibration(checkpoints, sorted_draft, tmp_path):
    from s2d.bench.registry import MethodContext, MethodOptions, ModelStore, build_method
    from s2d.calibrate import calibration_path, save_calibration
    from s2d.sampling import SamplingParams

    target = checkpoints["target"]
    ctx = MethodContext(target, sorted_draft, MethodOptions(dtype="float32", ignore_eos=True), ModelStore())
    path = calibration_path(sorted_draft)
    # s2d is lookup + one exit of the sorted draft: which exit and its knobs come from the calibration
    assert build_method("s2d-cal", ctx).engine.drafter.inner.length.current == 3  # no calibration yet: defaults
    save_calibration(path, target.name, {"exit": 1, "num_draft_tokens": 2, "stop_threshold": 0.1, "lookup_tokens": 3})
    try:
        method = build_method("s2d-cal", ctx)
        assert method.engine.drafter.inner.length.current == 2 and method.engine.num_draft_tokens == 3
        assert method.engine.drafter.inner.config.exits == (1,)
        prompt = [5, 6, 7, 5, 6]
        got = method.generate(prompt, SamplingParams(), 16)
        ref = build_method("ar", ctx).generate(prompt, SamplingParams(), 16)
        assert got.tokens == ref.tokens and len(got.proposed_at) <= 3
    finally:
        path.unlink()
