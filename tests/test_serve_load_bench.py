"""The pure parts of benchmarks/serve_load.py: prompts cut, jobs spread, rounds interleaved and compared, peer
arguments built. The benchmark itself needs servers and minutes; none of this does (no server, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clitools import benchmark_module

serve_load = benchmark_module("serve_load")


def test_cut_prompt_at_a_line_end():
    text = "def f():\n    return 1\n\ndef g():\n    return 2\n"
    assert serve_load.cut_prompt(text, 1000) == text
    assert serve_load.cut_prompt(text, 0) == text  # 0: uncut
    assert serve_load.cut_prompt(text, 24) == "def f():\n    return 1\n\n"  # the newline at 23 is kept
    assert serve_load.cut_prompt(text, 22) == "def f():\n    return 1\n"
    assert serve_load.cut_prompt("x" * 50, 10) == "x" * 10  # no line end within: cut at the limit


def test_read_prompts_spread_and_cut(tmp_path):
    rows = [{"question_id": i, "turns": [f"line {i}\n" + "y" * 40 + "\n"]} for i in range(10)]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = serve_load.read_prompts(f, 5, 20)
    assert got == [f"line {i}\n" for i in (0, 2, 4, 6, 8)]
    assert len(serve_load.read_prompts(f, None, 0)) == 10
    f.write_text('{"turns": []}\n')
    with pytest.raises(SystemExit, match="turns"):
        serve_load.read_prompts(f, None, 0)


def test_client_jobs_mixed_and_per_target():
    targets, prompts = ("a", "b", "c"), ["p0", "p1", "p2", "p3"]
    mixed = serve_load.client_jobs(targets, prompts, 2, 3, per_target=False)
    assert mixed == [[("a", "p0", False), ("b", "p1", True), ("c", "p2", False)],
                     [("b", "p3", False), ("c", "p0", True), ("a", "p1", False)]]
    own = serve_load.client_jobs(targets, prompts, 6, 2, per_target=True)
    assert [{t for t, _, _ in c} for c in own] == [{"a"}, {"b"}, {"c"}, {"a"}, {"b"}, {"c"}]


def test_rounds_interleave_and_ratios():
    assert serve_load.schedule(["s2d", "0", "1"], 2) == [(1, "s2d"), (1, "0"), (1, "1"),
                                                          (2, "s2d"), (2, "0"), (2, "1")]
    by_round = serve_load.ratios([300.0, 150.0, 200.0], [200.0, 100.0, 0.0])
    assert by_round == [1.5, 1.5, None]  # a peer that finished nothing has no ratio
    assert serve_load.median(by_round) == 1.5
    assert serve_load.median([1.0, 3.0, 2.0]) == 2.0
    assert serve_load.median([None]) is None
    with pytest.raises(ValueError):
        serve_load.ratios([1.0], [1.0, 2.0])


def test_peer_argv_placeholder_and_common():
    common = ["-np", "32", "-c", "65536"]
    argv = serve_load.peer_argv("--spec-type draft-simple -md {exit_gguf} --spec-draft-n-max 3", common,
                                Path("/tmp/x/exit2.gguf"))
    assert argv == [*common, "--spec-type", "draft-simple", "-md", "/tmp/x/exit2.gguf", "--spec-draft-n-max", "3"]
    assert serve_load.peer_argv("", [], None) == []
    assert serve_load.peer_argv("-md '/a b/c.gguf'", [], None) == ["-md", "/a b/c.gguf"]  # shell quoting
    with pytest.raises(SystemExit, match="--export-exit"):
        serve_load.peer_argv("-md {exit_gguf}", [], None)
    assert serve_load.peer_label("") == "llama-server plain"
    assert serve_load.peer_label("--spec-type ngram-mod") == "llama-server --spec-type ngram-mod"


def test_cpu_kind_and_summaries():
    assert serve_load.cpu_kind({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}) == "AMX"
    assert serve_load.cpu_kind({"avx2", "avx512f", "avx512_bf16"}) == "AVX512-BF16"
    assert serve_load.cpu_kind({"avx2"}) == "AVX2"
    results = [{"target": "a", "latency": 1.0, "ttft": 0.5, "tokens": 10, "stream": True, "end": 1.0},
               {"target": "b", "latency": 3.0, "ttft": 3.0, "tokens": 30, "stream": False, "end": 4.0}]
    s = serve_load.summary(results, 1, 4.0)
    assert s["throughput_tokens_per_s"] == 10.0 and s["errors"] == 1 and s["succeeded"] == 2
    assert s["ttft_p50_s"] == 0.5 and s["latency_p95_s"] == 3.0
    per = serve_load.per_target(results, [("c", "boom")], 4.0)
    assert per["a"]["throughput_own_span_tokens_per_s"] == 10.0 and per["a"]["throughput_tokens_per_s"] == 2.5
    assert per["c"]["errors"] == 1 and per["c"]["succeeded"] == 0
