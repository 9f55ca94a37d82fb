"""Helpers for tests that drive the command line and edit checkpoints on disk (a test utility, not tests)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from safetensors.torch import load_file, save_file

from s2d.cli import main


def benchmark_module(name: str) -> ModuleType:
    """benchmarks/<name>.py loaded as module ``name`` (registered in sys.modules: dataclasses look their module up
    while the file runs, and one benchmark imports another by name)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr). Arguments may be paths or numbers."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, command: str) -> str:
    """The CLI's error output: exactly one line, ``s2d COMMAND: error: ...``, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"s2d {command}: error: "), err
    return lines[0]


def edit_weights(path: Path, edit: Callable[[dict], object]) -> None:
    """Apply ``edit`` to the tensors of ``path``'s model.safetensors and write them back."""
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def train_args(init, src, out, *extra) -> list:
    """A tiny train-draft run's arguments (seq_len 8, batches of 2, two steps), then ``extra``."""
    return ["train-draft", "--init", init, "--exits", "1,3", "--data", src, "--out", out, "--seq-len", 8,
            "--steps", 2, "--batch-size", 2, "--micro-batch-size", 2, "--no-autocast", "--save-dtype", "float32",
            "--no-progress", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to show that nothing in it changed."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
