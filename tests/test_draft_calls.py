"""benchmarks/draft_calls.py: every draft-model call timed and grouped, on tiny checkpoints."""

from __future__ import annotations

import json
import random

import pytest
from clitools import benchmark_module

draft_calls = benchmark_module("draft_calls")


def test_rows_fall_in_their_buckets():
    assert [draft_calls.row_bucket(n) for n in (1, 2, 64, 65, 300)] == ["1", "2-64", "2-64", ">64", ">64"]


def table(out: str) -> dict[tuple[str, str, str], list[str]]:
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    return {tuple(c.strip() for c in r[:3]): [c.strip() for c in r[3:]] for r in rows[1:]}


@pytest.mark.parametrize("window", [0, 40])
def test_a_run_times_the_draft_calls_and_the_window_bounds_the_prefill(small_target_dir, sorted_draft_dir, tmp_path,
                                                                      capsys, window):
    questions = tmp_path / "q.jsonl"
    rng = random.Random(0)
    text = "".join(chr(rng.randrange(33, 127)) for _ in range(150))  # 150 byte tokens that lookup rarely continues
    questions.write_text("\n".join(json.dumps({"question_id": i, "category": "c", "turns": [text[i:] + text[:i]]})
                                   for i in range(2)) + "\n")
    draft_calls.main(["--target", str(small_target_dir), "--draft", str(sorted_draft_dir),
                      "--questions", str(questions), "--max-new-tokens", "40", "--draft-window", str(window)])
    out = capsys.readouterr().out
    assert "2 prompts" in out and "80 new tokens" in out
    calls = table(out)
    assert calls, out
    for (kind, layers, bucket), (n, rows, ms, *_rest) in calls.items():
        assert kind in ("Layers", "Head") and int(n) >= 1 and int(rows) >= int(n) and float(ms) >= 0
    prefill = sum(int(v[1]) for k, v in calls.items() if k[0] == "Layers" and k[2] == ">64")
    if window:
        assert prefill == 0  # at most 40 prompt tokens enter the draft at once
    else:
        assert prefill >= 2 * 100  # each prompt's whole text, entered at its first model step


def test_bad_arguments_are_refused(small_target_dir, sorted_draft_dir, tmp_path):
    for bad in (["--draft-window", "-1"], ["--max-new-tokens", "0"]):
        with pytest.raises(SystemExit):
            draft_calls.main(["--target", str(small_target_dir), "--draft", str(sorted_draft_dir),
                              "--questions", str(tmp_path / "q.jsonl"), *bad])
