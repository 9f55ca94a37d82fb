"""benchmarks/costs.py: the stream probe (``--stream``) times the runtime's product over the bytes it claims; the
ceiling table bounds what any kernel could reach."""

from __future__ import annotations

import pytest
import torch
from clitools import benchmark_module

from s2d.model import native

costs = benchmark_module("costs")


def test_the_floor_buffer_outgrows_the_last_level_cache(tmp_path):
    """The floor reads a buffer twice the largest cache sysfs reports, so it streams from DRAM on any host."""
    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "491520K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert costs.last_level_cache_bytes(tmp_path) == 480 << 20
    (tmp_path / "index3" / "size").write_text("32M\n")
    assert costs.last_level_cache_bytes(tmp_path) == 32 << 20
    assert costs.last_level_cache_bytes(tmp_path / "absent") == 32 << 20  # sysfs silent: the Zen 4's 32 MiB
    assert costs.FLOOR_MIN_BYTES == max(64 << 20, 2 * costs.last_level_cache_bytes())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stream_times_the_runtime_product_over_the_pass_bytes(monkeypatch, dtype):
    if native.library() is None:
        pytest.skip("no native runtime here")
    monkeypatch.setattr(costs, "FLOOR_MIN_BYTES", 1 << 16)  # a small weight: the test needs no DRAM-sized one
    width, nbytes = 96, 100_000
    stream = costs.Stream(nbytes, width, dtype, sizes=[1, 3])
    outputs, size = stream.w.shape[0], stream.w.element_size()
    assert stream.w.shape[1] == width and outputs % 32 == 0
    assert outputs * width * size <= nbytes < (outputs + 32) * width * size  # whole panels, the pass's bytes
    assert stream.seconds(2.0) == pytest.approx(2.0 * nbytes / (outputs * width * size))
    for k in (1, 3):
        stream(k)
        assert torch.equal(stream.out[k], native.linear(stream.x[k], stream.w))


def test_resident_stream_reads_the_pass_bytes_not_a_dram_sized_weight(monkeypatch):
    """``--stream-bytes pass``: the weight is the pass's own bytes even where FLOOR_MIN_BYTES is larger, so it may
    stay cached between calls as a pass's weights do."""
    if native.library() is None:
        pytest.skip("no native runtime here")
    monkeypatch.setattr(costs, "FLOOR_MIN_BYTES", 1 << 20)
    width, nbytes = 96, 100_000
    dram = costs.Stream(nbytes, width, torch.bfloat16, sizes=[1])
    resident = costs.Stream(nbytes, width, torch.bfloat16, sizes=[1], resident=True)
    assert dram.w.numel() * 2 > (1 << 20) - 32 * width * 2  # whole panels of at least FLOOR_MIN_BYTES
    outputs = resident.w.shape[0]
    assert outputs % 32 == 0 and outputs * width * 2 <= nbytes < (outputs + 32) * width * 2
    resident(1)
    assert torch.equal(resident.out[1], native.linear(resident.x[1], resident.w))


def test_stream_table_reports_what_rows_add(capsys):
    report = {"targets": {"m": {"native": {1: 2.0, 6: 3.0, "stream 1": 1.5, "stream 6": 2.2},
                                "back to back": {1: 2.0, 6: 3.2}}}}  # no stream there: no row
    costs.print_stream(report, [1, 6])
    out = capsys.readouterr().out
    assert "| m | native | 1.50 | 2.20 | 0.35 |" in out
    assert "back to back" not in out


def test_ceiling_table_gives_the_least_time_any_kernel_could_take(capsys):
    """``least``: a k-token pass's products and attention at the ceiling's rate, and that over the one-token pass."""
    row = {"params": 50_000_000, "attention_flops_per_row": 10_000_000,
           "native": {1: 2.0, 16: 6.0, "floor": 1.5, "peak": 1.0, "ceiling": 500.0}}
    costs.print_bounds({"targets": {"m": row}}, [1, 16])
    out = capsys.readouterr().out
    # 16 rows: 2 * 16 * 5e7 + 16 * 1e7 = 1.76 GFLOP at 500 GFLOP/s = 3.52 ms, 1.76x the 2 ms one-token pass
    assert "| m | native | 500 | 3.52 | 1.76 |" in out
    assert costs.pass_flops(row, 16) == pytest.approx(1.76e9)
    costs.print_bounds({"targets": {"m": {**row, "native": {k: v for k, v in row["native"].items() if k != "ceiling"}}}},
                       [1, 16])
    assert "ceiling GFLOP/s" not in capsys.readouterr().out  # not measured (AMX): no table


def test_peak_measures_the_ceiling_in_the_same_calls(monkeypatch):
    if native.library() is None:
        pytest.skip("no native runtime here")
    monkeypatch.setattr(costs, "PEAK_SHAPE", (4, 64, 64))
    peak = costs.Peak(torch.bfloat16)
    for _ in range(3):
        peak()
    assert peak.take() > 0
    if native.isa_level() >= 3:
        assert peak.ceiling is None  # AMX tiles: no ceiling measured (native.dot_peak)
        return
    assert peak.ceiling is not None and peak.ceiling > 0
    assert peak.ceilings == []  # taken: the next take starts afresh


def test_placement_lines_give_each_round_its_ratios_and_hand_off(capsys):
    """Back to back, the best of each size may come from different rounds: ratios are printed round by round,
    each with the threads' hand-off measured in it."""
    rounds = [{1: 2.0, 6: 2.3, 16: 3.6, "handoff": 31.0}, {1: 1.6, 6: 2.4, 16: 4.4, "handoff": 170.0}]
    report = {"targets": {"m": {"native": {1: 2.1, "handoff": 33.0},
                                "back to back": {1: 1.6, 6: 2.3, 16: 3.6, "rounds": rounds, "handoffs": [31.0, 170.0]}}}}
    costs.print_placement(report, [1, 6, 16])
    out = capsys.readouterr().out
    assert ("hand-off 31 ns: 6 tok / 1 tok 1.15, 16 tok / 1 tok 1.80; "
            "hand-off 170 ns: 6 tok / 1 tok 1.50, 16 tok / 1 tok 2.75") in out
    assert "m, native: 33; m, back to back: 31/170" in out
    assert costs.in_ms({1: 0.002, "handoff": 31.0, "rounds": [{1: 0.002, "handoff": 31.0}]}) == {
        1: 2.0, "handoff": 31.0, "rounds": [{1: 2.0, "handoff": 31.0}]}


def _ab_settings():
    return benchmark_module("ab_settings")  # its `from costs import ...` finds the module loaded above


def test_ab_settings_reads_a_setting_and_refuses_bad_ones():
    ab = _ab_settings()
    assert ab.parse_setting("prefetch_rows=4,1") == ("prefetch_rows", [4, 1])
    assert ab.parse_setting("wide_products=0,1") == ("wide_products", [False, True])
    assert ab.parse_setting("fma_products=1,0") == ("fma_products", [True, False])
    for bad in ("prefetch_rows", "unknown=1,2", "prefetch_rows=4"):
        with pytest.raises(ValueError, match="--setting"):
            ab.parse_setting(bad)


def test_many_rounds_report_how_the_ratios_spread(capsys):
    rounds = [{1: 2.0, 6: 2.0 * r} for r in (1.3, 1.5, 1.2, 1.9, 1.4)]
    costs.print_placement({"targets": {"m": {"back to back": {"rounds": rounds}}}}, [1, 6])
    out = capsys.readouterr().out
    assert "over 5 rounds: 6 tok / 1 tok 1.20 / 1.30 / 1.40 / 1.50 / 1.90 (min / q1 / median / q3 / max)" in out
    costs.print_placement({"targets": {"m": {"back to back": {"rounds": rounds[:3]}}}}, [1, 6])
    assert "over 3 rounds" not in capsys.readouterr().out  # too few rounds for quartiles


def test_breakdown_table_gives_each_phase_against_the_one_token_pass(capsys):
    one = {"qkv": 0.5, "attention": 0.3, "rest": 0.1, "total": 0.9}
    six = {"qkv": 0.6, "attention": 0.6, "rest": 0.1, "total": 1.3}
    costs.print_breakdown({"targets": {"m": {"breakdown": {1: one, 6: six}}, "n": {}}})
    out = capsys.readouterr().out
    assert "| m: rows | qkv | attention | rest | total |" in out
    assert "| 1 | 0.500 | 0.300 | 0.100 | 0.900 |" in out
    assert "| 6 | 0.600 (1.20x) | 0.600 (2.00x) | 0.100 (1.00x) | 1.300 (1.44x) |" in out
