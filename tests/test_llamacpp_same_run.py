"""The pure parts of benchmarks/llamacpp_same_run.py: llama.cpp's outputs read, prompts cut, rounds compared.

The benchmark itself needs llama.cpp's binaries and minutes; none of this does (no torch, no binaries).
"""

from __future__ import annotations

import json

import pytest
from clitools import benchmark_module

from s2d.bench.cpu import cpu_kind

same_run = benchmark_module("llamacpp_same_run")

BENCH_JSON = json.dumps([
    {"n_prompt": 0, "n_gen": 128, "n_depth": 400, "avg_ns": 600_000_000, "samples_ns": [500_000_000, 640_000_000,
                                                                                        660_000_000]},
    {"n_prompt": 300, "n_gen": 0, "n_depth": 0, "avg_ns": 150_000_000},
])

BENCH_MD = """
| model                          |       size |     params | backend    | threads |            test |                  t/s |
| ------------------------------ | ---------: | ---------: | ---------- | ------: | --------------: | -------------------: |
| llama ?B BF16                  | 100.18 MiB |    52.51 M | CPU        |       2 |           pp300 |      2303.12 ± 41.20 |
| llama ?B BF16                  | 100.18 MiB |    52.51 M | CPU        |       2 |    tg128 @ d400 |        227.41 ± 3.69 |

build: 0c1e570 (1)
"""

COMPLETION_ERR = """
0.00.108.823 I system_info: n_threads = 2 (n_threads_batch = 2) / 2 | CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | \
F16C = 1 | FMA = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 0 | OPENMP = 1 |
0.00.147.861 I common_perf_print:    sampling time =       0.41 ms
0.00.147.925 I common_perf_print: prompt eval time =     127.84 ms /   284 tokens (    0.45 ms per token)
0.00.147.942 I common_perf_print:        eval time =     572.00 ms /   127 runs   (    4.50 ms per token)
"""


def test_llama_bench_json_takes_the_median_sample() -> None:
    tg, pp = same_run.parse_llama_bench(BENCH_JSON)
    assert (tg.test, pp.test) == ("tg128 @ d400", "pp300")
    assert tg.tokens_per_s == pytest.approx(128 / 0.64)  # the median sample, not the mean
    assert pp.tokens_per_s == pytest.approx(2000)  # no samples: the average


def test_llama_bench_markdown() -> None:
    pp, tg = same_run.parse_llama_bench(BENCH_MD)
    assert (pp.n_prompt, pp.n_gen, pp.n_depth, pp.tokens_per_s) == (300, 0, 0, 2303.12)
    assert (tg.n_prompt, tg.n_gen, tg.n_depth, tg.tokens_per_s) == (0, 128, 400, 227.41)
    with pytest.raises(same_run.SameRunError):
        same_run.parse_llama_bench("error: failed to load model")


def test_completion_timings_and_build_flags() -> None:
    done = same_run.parse_completion(COMPLETION_ERR)
    assert (done.prompt_tokens, done.new_tokens) == (284, 128)  # the prompt's pass yields the first token
    assert done.seconds == pytest.approx((127.84 + 572.00 + 0.41) / 1000)
    flags = same_run.parse_system_info(COMPLETION_ERR)
    assert flags["AVX512_BF16"] and not flags["AMX_INT8"]
    assert same_run.build_kind(flags) == "AVX512-BF16"
    assert same_run.build_kind({"AVX2": True, "AVX512": False}) == "AVX2"
    assert cpu_kind({"avx2", "avx512f", "avx512_bf16"}) == "AVX512-BF16"
    assert cpu_kind({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}) == "AMX"
    with pytest.raises(same_run.SameRunError):
        same_run.parse_completion("llama_model_load: error loading model")
    with pytest.raises(same_run.SameRunError):
        same_run.parse_system_info("no such line")


def test_busy_seconds_counts_stolen_time_not_idle() -> None:
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice
    assert same_run.busy_seconds("cpu  100 0 50 9000 30 5 5 40 0 0", 100) == pytest.approx(2.0)


def test_prompt_cut_at_a_line_end() -> None:
    text = "".join(f"line {i:04d}\n" for i in range(300))  # 10 characters a line
    cut = same_run.cut_prompt(text, 1500)
    assert cut == text[:1500] and cut.endswith("\n")
    assert same_run.cut_prompt(text, 1505) == text[:1500]  # back to the last whole line
    assert same_run.cut_prompt("short\n", 1500) == "short\n"
    assert same_run.cut_prompt("x" * 2000, 1500) == "x" * 1500  # no line end: a hard cut
    assert same_run.spread(list(range(30)), 3) == [0, 10, 20]
    assert same_run.spread([1, 2], 5) == [1, 2]


def test_rounds_compare_within_a_round() -> None:
    decode = same_run.Measure("ms/token", higher_is_better=False)
    prefill = same_run.Measure("tokens/s", higher_is_better=True)
    for ours, theirs, floor in [(5.0, 4.0, 2.5), (10.0, 9.0, 5.0), (4.0, 6.0, 2.0)]:  # the host drifts 2x
        decode.add("s2d", ours)
        decode.add("llama.cpp", theirs)
        decode.add("floor", floor)
        prefill.add("s2d", 1000 / ours)
        prefill.add("llama.cpp", 1000 / theirs)
    assert decode.ratios() == pytest.approx([0.8, 0.9, 1.5])  # speed ours / theirs, each round on its own
    assert prefill.ratios() == pytest.approx(decode.ratios())
    assert decode.to_floor() == pytest.approx([2.0, 2.0, 2.0])
    assert decode.median("s2d") == 5.0 and decode.median("missing") is None
    record = decode.to_json()
    assert record["median"] == {"s2d": 5.0, "llama.cpp": 6.0, "floor": 2.5}
    assert "s2d_to_floor_per_round" in record and "s2d_to_floor_per_round" not in prefill.to_json()
    for share in (0.01, 0.5, 0.0):
        decode.add("others", share)
    rows = same_run.table({"zoo-l": {"decode @ d400": decode, "prefill 300": prefill}}).splitlines()
    assert rows[2] == ("| zoo-l | decode @ d400 (ms/token) | 5.00 | 6.00 | 2.50 | 0.90x (0.80, 0.90, 1.50) "
                       "| 2.00 (2.00, 2.00, 2.00) | 1%, 50%, 0% |")
    assert rows[3].startswith("| zoo-l | prefill 300 (tokens/s) | 200 | 167 | - | 0.90x")
