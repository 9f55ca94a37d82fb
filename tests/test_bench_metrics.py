"""Benchmark arithmetic on synthetic records, and the results.json contract."""

from __future__ import annotations

import copy
import json

import pytest

from s2d.bench.errors import BenchError
from s2d.bench.metrics import ALL, aggregate, mark_greedy_identical
from s2d.bench.records import QuestionRecord, TurnRecord
from s2d.bench.registry import MethodOptions
from s2d.bench.results import results_document, validate_results
from s2d.bench.runner import BenchConfig, BenchOutcome, Skipped


def rec(method: str, qid: int, category: str, turns: list[tuple[int, float, int | None]], target: str = "t",
        tokens: list[list[int]] | None = None, proposed: list[int] = (), accepted: list[int] = (),
        exits: dict[int, int] | None = None) -> QuestionRecord:
    """turns: (new tokens, seconds, target passes) each; token ids default to 0..n-1."""
    out = []
    for j, (n, seconds, passes) in enumerate(turns):
        ids = tokens[j] if tokens else list(range(n))
        out.append(TurnRecord(10, ids, seconds, passes, list(proposed), list(accepted), dict(exits or {})))
    return QuestionRecord(target, method, qid, category, out)


def by(summaries, method, category, target="t"):
    return next(s for s in summaries if (s.target, s.method, s.category) == (target, method, category))


def test_speedup_is_ratio_of_mean_question_speeds():
    records = [
        rec("ar", 1, "a", [(100, 10.0, 100)]),  # 10 tok/s
        rec("ar", 2, "a", [(50, 2.0, 50), (50, 3.0, 50)]),  # two turns: 100 / 5 = 20 tok/s
        rec("sd", 1, "a", [(100, 5.0, 40)]),  # 20 tok/s
        rec("sd", 2, "a", [(50, 1.0, 20), (50, 1.0, 20)]),  # 50 tok/s
    ]
    runs = aggregate(records)
    ar, sd = by(runs, "ar", "a"), by(runs, "sd", "a")
    assert ar.tokens_per_s == pytest.approx(15.0)  # mean of 10 and 20, not 200 tokens / 15 s
    assert sd.tokens_per_s == pytest.approx(35.0)
    assert sd.speedup == pytest.approx(35.0 / 15.0)
    assert ar.speedup == pytest.approx(1.0)
    assert sd.mean_accepted_tokens == pytest.approx(200 / 80)  # ratio of sums over all turns
    assert ar.mean_accepted_tokens == pytest.approx(1.0)
    assert sd.num_questions == 2 and sd.num_turns == 3 and sd.new_tokens == 200
    assert sd.elapsed_s == pytest.approx(7.0)
    assert sd.speedup_vs_hf_ar is None  # no hf-ar in this run


def test_categories_all_and_targets_are_separate():
    records = [
        rec("ar", 1, "x", [(10, 1.0, 10)]), rec("ar", 2, "y", [(10, 2.0, 10)]),
        rec("pld", 1, "x", [(10, 0.5, 5)]), rec("pld", 2, "y", [(10, 2.0, 10)]),
        rec("ar", 1, "x", [(10, 4.0, 10)], target="u"), rec("pld", 1, "x", [(10, 1.0, 10)], target="u"),
    ]
    runs = aggregate(records)
    assert [(s.target, s.method, s.category) for s in runs] == [
        ("t", "ar", "x"), ("t", "ar", "y"), ("t", "ar", ALL), ("t", "pld", "x"), ("t", "pld", "y"),
        ("t", "pld", ALL), ("u", "ar", "x"), ("u", "ar", ALL), ("u", "pld", "x"), ("u", "pld", ALL)]
    assert by(runs, "pld", "x").speedup == pytest.approx(2.0)
    assert by(runs, "pld", "y").speedup == pytest.approx(1.0)
    assert by(runs, "pld", ALL).speedup == pytest.approx(((20 + 5) / 2) / ((10 + 5) / 2))
    assert by(runs, "pld", "x", "u").speedup == pytest.approx(4.0)  # against u's own ar, not t's


def test_no_baseline_and_unknown_passes_give_none():
    runs = aggregate([rec("hf-ar", 1, "a", [(10, 1.0, None)]), rec("hf-pld", 1, "a", [(10, 0.5, 4)])])
    hf_ar, hf_pld = by(runs, "hf-ar", "a"), by(runs, "hf-pld", "a")
    assert hf_ar.speedup is None and hf_ar.mean_accepted_tokens is None
    assert hf_pld.speedup_vs_hf_ar == pytest.approx(2.0)
    assert hf_pld.mean_accepted_tokens == pytest.approx(2.5)


def test_acceptance_by_position_and_exit_histogram():
    runs = aggregate([
        rec("sd", 1, "a", [(10, 1.0, 4)], proposed=[4, 4, 2], accepted=[3, 2], exits={2: 6, 4: 4}),
        rec("sd", 2, "a", [(10, 1.0, 4)], proposed=[4], accepted=[1], exits={2: 4}),
    ])
    sd = by(runs, "sd", ALL)
    assert sd.acceptance_by_position == pytest.approx([4 / 8, 2 / 4, 0 / 2])
    assert sd.draft_acceptance_rate == pytest.approx(6 / 14)
    assert sd.exit_histogram == {"2": 10, "4": 4}


def test_greedy_identical_compares_every_turn_to_ar():
    records = [
        rec("ar", 1, "a", [(2, 1.0, 2), (2, 1.0, 2)], tokens=[[1, 2], [3, 4]]),
        rec("ar", 2, "a", [(2, 1.0, 2)], tokens=[[5, 6]]),
        rec("sd", 1, "a", [(2, 1.0, 1), (2, 1.0, 1)], tokens=[[1, 2], [3, 9]]),  # second turn differs
        rec("sd", 2, "a", [(2, 1.0, 1)], tokens=[[5, 6]]),
        rec("sd", 2, "a", [(2, 1.0, 1)], tokens=[[5, 6]], target="other"),  # no ar on that target
    ]
    mark_greedy_identical(records)
    assert [r.greedy_identical for r in records] == [True, True, False, True, None]
    runs = aggregate(records)
    assert by(runs, "sd", "a").greedy_identical == pytest.approx(0.5)
    assert by(runs, "ar", "a").greedy_identical == pytest.approx(1.0)
    assert by(runs, "sd", "a", "other").greedy_identical is None


def test_record_json_round_trip():
    r = rec("sd", 7, "a", [(3, 0.5, 2)], proposed=[2], accepted=[1], exits={3: 2})
    back = QuestionRecord.from_json(json.loads(json.dumps(r.to_json())))
    assert back == r


def results_doc(tmp_path):
    cfg = BenchConfig(targets=(tmp_path / "t",), methods=("ar", "pld"), questions=tmp_path / "q.jsonl",
                      options=MethodOptions(dtype="float32"))
    records = [rec("ar", 1, "a", [(10, 1.0, 10)]), rec("pld", 1, "a", [(10, 0.5, 5)])]
    mark_greedy_identical(records)
    outcome = BenchOutcome(records, [Skipped("t", "sd", "why")], {"t": str(tmp_path / "t")})
    return json.loads(json.dumps(results_document(cfg, outcome, aggregate(records))))


def test_results_document_follows_schema(tmp_path):
    doc = results_doc(tmp_path)
    validate_results(doc)
    run = next(r for r in doc["runs"] if r["method"] == "pld" and r["category"] == ALL)
    assert run["speedup"] == pytest.approx(2.0) and run["greedy_identical"] == 1.0
    assert doc["config"]["options"]["dtype"] == "float32" and doc["skipped"][0]["method"] == "sd"


def test_results_say_which_native_code_ran(tmp_path, monkeypatch):
    from s2d.model import native

    env = results_doc(tmp_path)["environment"]
    assert env["native_isa"] == native.isa_kind() and env["native_products"] == native.product_kind()
    monkeypatch.setenv("S2D_NATIVE_ISA", "avx2")  # capped: AVX2 wherever the runtime runs at all
    env = results_doc(tmp_path)["environment"]
    assert env["native_isa"] in ("AVX2", "AVX512", "none")  # AVX512: the AVX2 level on 512-bit vectors
    assert env["native_products"] in ("256-bit FMAs", "512-bit FMAs", "torch")


@pytest.mark.parametrize("breakage", ["drop_runs", "drop_field", "wrong_type", "bool_count", "schema"])
def test_results_validation_catches_breakage(tmp_path, breakage):
    doc = copy.deepcopy(results_doc(tmp_path))
    if breakage == "drop_runs":
        del doc["runs"]
    elif breakage == "drop_field":
        del doc["runs"][0]["mean_accepted_tokens"]
    elif breakage == "wrong_type":
        doc["runs"][0]["tokens_per_s"] = "fast"
    elif breakage == "bool_count":
        doc["runs"][0]["num_questions"] = True
    else:
        doc["schema"] = "something/else"
    with pytest.raises(BenchError):
        validate_results(doc)


def test_method_order_survives_a_method_skipped_on_the_first_target():
    records = [rec("ar", 1, "a", [(10, 1.0, 10)], target="s"), rec("pld", 1, "a", [(10, 1.0, 5)], target="s"),
               rec("ar", 1, "a", [(10, 1.0, 10)], target="l"), rec("sd", 1, "a", [(10, 1.0, 4)], target="l"),
               rec("pld", 1, "a", [(10, 1.0, 5)], target="l")]
    order = [(s.target, s.method) for s in aggregate(records, ["ar", "sd", "pld"]) if s.category == ALL]
    assert order == [("s", "ar"), ("s", "pld"), ("l", "ar"), ("l", "sd"), ("l", "pld")]
