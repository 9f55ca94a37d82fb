"""Nothing non-finite passes as success (issue 28, class 6): a draft or model holding NaN/inf is refused by
``export-gguf`` and by ``train-draft --objective vocab|ngram`` with one line naming the tensor, and nothing
is written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from clitools import edit_weights, one_line_error, run

BAD = "model.layers.0.mlp.down_proj.weight"


def listing(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def nan_draft(copy_of) -> Path:
    path = copy_of("draft")

    def poison(state: dict) -> None:
        state[BAD][0, 0] = float("nan")
        state["model.norm.weight"][-1] = float("inf")
    edit_weights(path, poison)
    return path


@pytest.mark.parametrize("command", ["export-gguf", "vocab", "ngram"])
def test_nonfinite_weights_are_refused(nan_draft, tmp_path, capsys, command, train_src):
    before, out = listing(tmp_path), tmp_path / "out"
    if command == "export-gguf":
        argv = ["export-gguf", "--model", nan_draft, "--out", tmp_path / "out.gguf", "--dtype", "float32"]
    else:
        argv = ["train-draft", "--objective", command, "--init", nan_draft, "--data", train_src, "--seq-len", 8,
                "--out", out, "--no-progress"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    line = one_line_error(err, argv[0])
    assert str(nan_draft) in line and "NaN or inf" in line and ("tensor " + BAD in line or "model.norm" in line)
    assert listing(tmp_path) == before  # nothing written: no --out, no temporary left behind


def test_a_deeper_exit_left_nan_does_not_block_exporting_a_shallower_one(tiny_checkpoint, tmp_path, capsys):
    import shutil
    src = Path(shutil.copytree(tiny_checkpoint(seed=5, num_layers=2, s2d_exits=[1, 2]), tmp_path / "sorted"))
    edit_weights(src, lambda s: s["model.layers.1.mlp.down_proj.weight"].fill_(float("nan")))
    assert run(capsys, "export-gguf", "--model", src, "--exit", 1, "--out", tmp_path / "e1.gguf")[0] == 0
    code, _, err = run(capsys, "export-gguf", "--model", src, "--exit", 2, "--out", tmp_path / "e2.gguf")
    assert code == 2 and "model.layers.1.mlp.down_proj.weight" in one_line_error(err, "export-gguf")
    assert not (tmp_path / "e2.gguf").exists()


def test_weights_beyond_float16_are_not_exported_as_inf(copy_of, tmp_path, capsys):
    src = copy_of("draft")
    edit_weights(src, lambda s: s[BAD].__setitem__((0, 0), 1e6))
    out = tmp_path / "h.gguf"
    code, _, err = run(capsys, "export-gguf", "--model", src, "--out", out, "--dtype", "float16")
    assert code == 2 and "beyond float16's range" in one_line_error(err, "export-gguf") and not out.exists()
    assert run(capsys, "export-gguf", "--model", src, "--out", out, "--dtype", "bfloat16")[0] == 0
