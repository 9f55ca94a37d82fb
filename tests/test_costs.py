"""benchmarks/costs.py's stream probe (``--stream``): the product it times is the runtime's, over the bytes it claims."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from s2d.model import native

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "costs.py"
_spec = importlib.util.spec_from_file_location("costs", _PATH)
costs = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = costs
_spec.loader.exec_module(costs)


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


def test_stream_table_reports_what_rows_add(capsys):
    report = {"targets": {"m": {"native": {1: 2.0, 6: 3.0, "stream 1": 1.5, "stream 6": 2.2},
                                "back to back": {1: 2.0, 6: 3.2}}}}  # no stream there: no row
    costs.print_stream(report, [1, 6])
    out = capsys.readouterr().out
    assert "| m | native | 1.50 | 2.20 | 0.35 |" in out
    assert "back to back" not in out
