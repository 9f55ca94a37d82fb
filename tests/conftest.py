"""Fixtures shared by the test modules: tiny random checkpoints (written once per session) and copies of them.

Checkpoint folders are session-scoped and shared: a test or fixture that writes into a checkpoint (side files,
edited weights) works on a copy (``copy_of``, or ``shutil.copytree``). Loaded models are left to each module
(module scope), since tests may edit a model object they were given."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from threads, and OpenMP threads spinning against another process's on a
# small machine slow everything down many times over.
torch.set_num_threads(1)

from clitools import train_args

from s2d.cli import main
from s2d.model.tiny import write_random_checkpoint

# The 3-exit sorted draft (byte tokenizer, 257 tokens) that the drafting tests run: exits after layers 1, 2, 3.
SORTED_DRAFT = dict(num_layers=3, hidden_size=48, num_heads=4, num_kv_heads=2, intermediate_size=96,
                    s2d_exits=[1, 2, 3])


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints written by transformers; all share the byte tokenizer.
    Session scope is safe: no test writes into them (tests that edit one take ``copy_of``)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "target": write_random_checkpoint(root / "target", num_layers=3, seed=1),
        "draft": write_random_checkpoint(root / "draft", hidden_size=32, num_layers=1, num_heads=2,
                                         num_kv_heads=1, intermediate_size=64, seed=2),
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """``write_random_checkpoint(**kwargs)``, written once per session for each distinct set of arguments
    (the same arguments give the same weights, so modules asking for the same model share one folder).
    Session scope is safe because nobody writes into these folders: copy one before adding files to it."""
    made: dict[str, Path] = {}

    def make(**kwargs) -> Path:
        key = json.dumps(kwargs, sort_keys=True)
        if key not in made:
            made[key] = write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "model", **kwargs)
        return made[key]
    return make


@pytest.fixture(scope="session")
def sorted_draft_dir(tiny_checkpoint) -> Path:
    """The 3-exit sorted draft that the drafting tests share. Session scope is safe: it is read, never written;
    tests that add side files beside it (n-gram model, steering maps, gates) copy it first."""
    return tiny_checkpoint(seed=5, **SORTED_DRAFT)


@pytest.fixture(scope="session")
def sorted_draft_checkpoint(sorted_draft_dir) -> Callable[..., Path]:
    """The sorted draft's folder: without ``into`` the shared read-only one (``sorted_draft_dir``), with ``into``
    a private copy there, for a test that adds or damages side files."""
    def make(into: Path | None = None) -> Path:
        return sorted_draft_dir if into is None else Path(shutil.copytree(sorted_draft_dir, into))
    return make


@pytest.fixture(scope="session")
def small_target_dir(tiny_checkpoint) -> Path:
    """A 2-layer target for the sorted draft (same byte tokenizer). Session scope is safe: it is only read."""
    return tiny_checkpoint(num_layers=2, seed=31)


@pytest.fixture(scope="session")
def train_src(tmp_path_factory) -> Path:
    """A little training text (tiny runs: seq_len 8, batches of 2). Session scope is safe: training reads it, and
    the tests that name it as an output check that nothing is written there."""
    path = tmp_path_factory.mktemp("data") / "src"
    path.mkdir()
    for i in range(3):
        (path / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    return path


@pytest.fixture(scope="session")
def trained_draft(tmp_path_factory, checkpoints, train_src) -> Path:
    """A draft with exits 1 and 3 written by a tiny ``s2d train-draft`` run. Session scope is safe: the tests
    export from it or refuse to write into it (and check it is intact); one that edits it copies it first."""
    out = tmp_path_factory.mktemp("trained") / "draft"
    assert main([str(a) for a in train_args(checkpoints["target"], train_src, out)]) == 0
    return out


@pytest.fixture
def copy_of(tmp_path, checkpoints) -> Callable[..., Path]:
    """A private copy of one of ``checkpoints`` for a test that edits its files."""
    def make(name: str = "target", as_name: str | None = None) -> Path:
        out = tmp_path / (as_name or f"copy-{name}")
        shutil.copytree(checkpoints[name], out)
        return out
    return make


@pytest.fixture(scope="module")
def serve_family(checkpoints):
    """The server tests' family: two targets (the draft checkpoint doubles as a second, smaller target) and one
    draft, float32. Module-scoped: servers mutate nothing in it, but each module starts its own."""
    from s2d.model.loading import load_family

    return load_family({"a": str(checkpoints["target"]), "b": str(checkpoints["draft"])},
                       str(checkpoints["draft"]), "float32", "cpu")


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def target_and_draft(request, checkpoints, sorted_draft_dir):
    """The target and the sorted draft in float32 and in bf16 (bf16 only where the native runtime makes rows
    bit-identical): the batch tests' pair."""
    from s2d.model import native
    from s2d.model.loading import load_model

    if request.param == "bfloat16" and native.library() is None:
        pytest.skip("bf16 rows are bit-identical only on the native runtime")
    return (load_model(checkpoints["target"], dtype=request.param),
            load_model(sorted_draft_dir, dtype=request.param))
