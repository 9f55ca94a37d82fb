"""benchmarks/prefill_paths.py: its arguments, and a whole run on a tiny checkpoint."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
from clitools import benchmark_module

from s2d.model import native
from s2d.model.tiny import write_random_checkpoint

prefill_paths = benchmark_module("prefill_paths")


def test_bad_arguments_are_refused_by_name():
    assert prefill_paths.prompt_lengths("300,1000") == [300, 1000]
    for bad in ("3,a", "", "1", "300,-5"):
        with pytest.raises(argparse.ArgumentTypeError):
            prefill_paths.prompt_lengths(bad)
    assert prefill_paths.positive_int("4") == 4
    for bad in ("0", "-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            prefill_paths.positive_int(bad)


@pytest.mark.parametrize("whole", [False, True], ids=["chunks", "whole"])
def test_a_run_times_both_paths_round_by_round(tmp_path, monkeypatch, capsys, whole):
    if native.library() is None:
        pytest.skip("no native runtime here")
    model = write_random_checkpoint(tmp_path / "m", hidden_size=64, num_layers=2, dtype=torch.bfloat16)
    argv = ["prefill_paths.py", "--model", str(model), "--tokens", "70,130", "--rounds", "2", *(["--whole"] * whole)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(native, "PREFILL_MAX_WIDTH", native.PREFILL_MAX_WIDTH)  # main() widens both for the run
    monkeypatch.setattr(native, "AMX_PREFILL_MAX_WIDTH", native.AMX_PREFILL_MAX_WIDTH)
    try:
        prefill_paths.main()
    except SystemExit as err:  # a CPU where the runtime does not pack weights
        pytest.skip(str(err))
    out = capsys.readouterr().out
    assert ("whole" if whole else "in chunks as decode.prefill") in out and "new lengths" in out
    for name in ("runtime", "torch"):
        line = next(x for x in out.splitlines() if x.startswith(name))
        speeds = line.split(None, 1)[1].removesuffix(" tokens/s").split(", ")
        assert len(speeds) == 2 and all(float(v) > 0 for v in speeds), line
    ratios = out.splitlines()[-1].split(":")[1].split(",")
    assert len(ratios) == 2 and all(float(r) > 0 for r in ratios)
