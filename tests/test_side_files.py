"""Side files and options (issue 28, class 8): a damaged file beside a draft is one line naming it; the
gates objective fits a draft's short context; bad calibrate-refine limits and binary training data are
refused; calibrations follow the model, not its name. Every refusal leaves the disk as it was."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import one_line_error, run
from tinymodels import small_vocab_model

from s2d.calibrate import CALIBRATION_FILE, calibration_entry, load_calibration, save_calibration
from s2d.drafting.gates import GATES_FILE, ExitGates
from s2d.drafting.refine import NGRAM_FILE, REFINE_FILE, CorpusNgram, RefineTable, RefineWeights, save_refine_table
from s2d.drafting.steer import STEER_FILE, SteeringMaps
from s2d.drafting.vocab import VOCAB_FILE, load_vocab, save_vocab
from s2d.model.config import CheckpointError

V, HIDDEN = 8, 32
SORTED = {"seed": 5, "num_layers": 3, "hidden_size": 48, "num_heads": 4, "num_kv_heads": 2,
          "intermediate_size": 96, "s2d_exits": [1, 2, 3]}  # a 3-exit sorted draft over the byte tokenizer


def listing(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def side_draft(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A folder with one valid copy of every side file, and the 3-exit in-memory draft they describe."""
    folder = tmp_path_factory.mktemp("side")
    draft = small_vocab_model(3, seed=0, exits=(1, 2, 3))
    CorpusNgram.build(np.array([1, 2, 3, 1, 2, 3, 4, 5, 1, 2] * 5), V, min_count=1).save(folder / NGRAM_FILE)
    alone = {kind: {"weights": {"w_ctx": 0.1}} for kind in ("alone", "behind_lookup")}
    save_refine_table(folder, {"fp": {"name": "t", "exits": {"1": alone}}}, {(1, False): RefineWeights()})
    maps = SteeringMaps(HIDDEN, targets={"fp": {"name": "t", "hidden_size": HIDDEN}})
    maps.maps["fp", 1] = torch.zeros(HIDDEN, HIDDEN)
    maps.save(folder)
    ExitGates({1: torch.zeros(HIDDEN), 2: torch.ones(HIDDEN)}, {1: 0.0, 2: 0.5}).save(folder)
    save_vocab(folder, list(range(V)), {})
    (folder / CALIBRATION_FILE).write_text(json.dumps({"t": {"num_draft_tokens": 3}}))
    return folder, draft


LOADERS = {
    NGRAM_FILE: lambda d, m: CorpusNgram.load(d / NGRAM_FILE, V),
    REFINE_FILE: lambda d, m: RefineTable.load(d),
    STEER_FILE: lambda d, m: SteeringMaps.load(d, HIDDEN),
    GATES_FILE: lambda d, m: ExitGates.load(d, m),
    VOCAB_FILE: lambda d, m: load_vocab(d, V),
    CALIBRATION_FILE: lambda d, m: load_calibration(d, d / CALIBRATION_FILE),
}


def damages(name: str, good: bytes) -> dict[str, bytes]:
    flipped = bytearray(good)
    # zip members carry a CRC, JSON a grammar; safetensors only its header (its data has no checksum)
    flipped[12 if name.endswith(".safetensors") else len(good) // 2] ^= 0xFF
    return {"half": good[: len(good) // 2], "last-byte-cut": good[:-2], "empty": b"", "garbage": os.urandom(300),
            "flipped": bytes(flipped), "nested": b"[" * 100_000, "not-utf8": b"\xff\xfe{"}


@pytest.mark.parametrize("name", list(LOADERS))
def test_a_damaged_side_file_is_one_line_naming_it(side_draft, tmp_path, name):
    folder, draft = side_draft
    load = LOADERS[name]
    load(folder, draft)  # the valid file loads
    (tmp_path / name).write_bytes((folder / name).read_bytes())
    good = (folder / name).read_bytes()
    for what, data in damages(name, good).items():
        if what == "last-byte-cut" and name.endswith(".json"):
            data = good[:-3]  # past the trailing newline and closing brace
        (tmp_path / name).write_bytes(data)
        before = listing(tmp_path)
        try:
            load(tmp_path, draft)
        except CheckpointError as err:
            message = str(err)
            assert str(tmp_path / name) in message and "\n" not in message, (what, message)
        else:
            pytest.fail(f"{name} {what}: accepted")
        assert listing(tmp_path) == before


def test_gates_that_are_not_finite_are_refused(tmp_path):
    draft = small_vocab_model(3, seed=0, exits=(1, 2, 3))
    ExitGates({1: torch.full((HIDDEN,), float("nan")), 2: torch.zeros(HIDDEN)}, {1: 0.0, 2: 0.0}).save(tmp_path)
    with pytest.raises(CheckpointError, match=f"{GATES_FILE}.*exit 1"):
        ExitGates.load(tmp_path, draft)


def test_a_damaged_ngram_file_is_one_cli_line(tiny_checkpoint, checkpoints, tmp_path, capsys):
    import shutil

    draft = Path(shutil.copytree(tiny_checkpoint(**SORTED), tmp_path / "draft"))
    CorpusNgram.build(np.arange(600) % 257, 257, min_count=1).save(draft / NGRAM_FILE)
    (draft / NGRAM_FILE).write_bytes((draft / NGRAM_FILE).read_bytes()[:-40])  # a copy cut short
    before = listing(tmp_path)
    capsys.readouterr()  # what writing the fixtures printed
    code, _, err = run(capsys, "generate", "--target", checkpoints["target"], "--draft", draft, "--method",
                       "refine-exit-1", "--prompt", "hello", "--max-new-tokens", 2)
    assert code == 2 and str(draft / NGRAM_FILE) in one_line_error(err, "generate")
    assert listing(tmp_path) == before


def test_gates_objective_fits_a_draft_whose_context_is_short(tiny_checkpoint, train_src, tmp_path, capsys):
    draft = tiny_checkpoint(seed=3, num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1,
                            intermediate_size=64, max_positions=64, s2d_exits=[1, 2])
    capsys.readouterr()
    code, out, err = run(capsys, "train-draft", "--objective", "gates", "--init", draft, "--data", train_src,
                         "--out", tmp_path / "gated", "--gate-positions", 300, "--no-progress")
    assert code == 0, err
    assert json.loads(out)["status"] == "completed" and (tmp_path / "gated" / GATES_FILE).is_file()


@pytest.mark.parametrize("limit", [0, -1])
def test_calibrate_refine_refuses_a_limit_below_one(tiny_checkpoint, checkpoints, tmp_path, capsys, limit):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\n")
    draft = tiny_checkpoint(**SORTED)
    before = listing(draft), listing(tmp_path)
    capsys.readouterr()
    code, _, err = run(capsys, "calibrate-refine", "--target", checkpoints["target"], "--draft", draft,
                       "--prompts", prompts, "--limit", limit)
    assert code == 2 and "--limit must be an integer >= 1" in one_line_error(err, "calibrate-refine")
    assert (listing(draft), listing(tmp_path)) == before


@pytest.mark.parametrize("objective", ["soft", "vocab", "ngram", "gates", "steer"])
def test_binary_training_data_is_refused_by_every_objective(tiny_checkpoint, checkpoints, tmp_path, capsys,
                                                            objective):
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.py").write_text("def f(x):\n    return x\n" * 50)
    (data / "blob.py").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 4)
    extra = {"soft": ["--exits", "1,3", "--steps", 1, "--seq-len", 8, "--batch-size", 2, "--micro-batch-size", 2],
             "steer": ["--targets", checkpoints["target"]]}.get(objective, [])
    init = tiny_checkpoint(**SORTED)
    before = listing(tmp_path)
    capsys.readouterr()
    code, _, err = run(capsys, "train-draft", "--objective", objective, "--init", init,
                       "--data", data, "--out", tmp_path / "out", "--no-progress", *extra)
    line = one_line_error(err, "train-draft")
    assert code == 2 and str(data / "blob.py") in line and "binary" in line, line
    assert listing(tmp_path) == before and not (tmp_path / "out").exists()


def test_calibrations_follow_the_model_not_its_name(tmp_path):
    model, other = small_vocab_model(1, seed=1), small_vocab_model(1, seed=2)
    path = tmp_path / CALIBRATION_FILE
    path.write_text(json.dumps({"old": {"num_draft_tokens": 5}}))  # written by an older s2d: keyed by name
    assert calibration_entry(load_calibration("", path), model, "old") == {"num_draft_tokens": 5}
    save_calibration(path, "old", {"num_draft_tokens": 2}, model)  # replaces the name-keyed entry
    data = load_calibration("", path)
    assert "old" not in data and len(data) == 1
    assert calibration_entry(data, model, "renamed")["num_draft_tokens"] == 2  # same model, another name
    assert calibration_entry(data, other, "old") == {}  # another model under the calibrated name
    assert calibration_entry(data, None, "old")["num_draft_tokens"] == 2  # no model at hand: by name
