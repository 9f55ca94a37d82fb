"""``s2d zoo build`` rebuilding a stage keeps what the user added to its folder (issue 28, class 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from s2d.model.config import CheckpointError
from s2d.zoo import TOKENIZER_DIR, Build, ZooBuild, stage_split, stage_tokenizer


def test_rebuilding_a_stage_keeps_the_users_files(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 10)
    cfg = ZooBuild(tmp_path / "family", preset="tiny", corpus=corpus, progress=False)
    build = Build(cfg)
    folder = stage_tokenizer(build, stage_split(build))
    written = sorted(p.name for p in folder.iterdir())
    assert json.loads((cfg.out / "build.json").read_text())["stages"]["tokenizer"]["files"] == written
    (folder / "NOTES.md").write_text("mine")
    (folder / "extra").mkdir()
    (folder / "extra" / "data.txt").write_text("also mine")
    (folder / "tokenizer.json").unlink()  # the stage's artefact is gone: it runs again
    build = Build(cfg)
    assert stage_tokenizer(build, stage_split(build)) == folder and TOKENIZER_DIR in build.ran
    assert (folder / "NOTES.md").read_text() == "mine" and (folder / "extra" / "data.txt").read_text() == "also mine"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*written, "NOTES.md", "extra"])
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_damaged_split_file_is_one_line_naming_it(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"m{i}.py").write_text(f"x = {i}\n")
    cfg = ZooBuild(tmp_path / "family", preset="tiny", corpus=corpus, progress=False)
    stage_split(Build(cfg))
    split = cfg.out / "split.json"
    split.write_text(split.read_text()[:20])  # cut short
    with pytest.raises(CheckpointError, match=f"malformed zoo split {split}: .*redo the split"):
        stage_split(Build(cfg))
