"""Issue 17, train-draft and export-exit: nothing of the user's is overwritten, a non-finite number never
passes as success, and a failed run leaves nothing that blocks its fix."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from clitools import edit_weights, one_line_error, run, snapshot, train_args

from s2d.cli import main
from s2d.model.loading import load_model

# ---- 1. no data loss -----------------------------------------------------------------------------

def test_export_exit_never_writes_over_the_users_files(capsys, trained_draft, tmp_path):
    users = tmp_path / "mine"
    (users / "sub").mkdir(parents=True)
    (users / "notes.txt").write_text("my notes")
    (users / "sub" / "data.csv").write_text("a,b\n")
    a_file = tmp_path / "report.txt"
    a_file.write_text("keep me")
    before = snapshot(users)
    for out, message in ((users, "is not empty and is not an earlier export-exit output: it holds notes.txt, sub"),
                         (a_file, "is a file, not a folder"), (trained_draft, "is also --draft")):
        code, _, err = run(capsys, "export-exit", "--draft", trained_draft, "--exit", 1, "--out", out)
        assert code == 2 and message in one_line_error(err, "export-exit")
    assert snapshot(users) == before and a_file.read_text() == "keep me"
    assert (trained_draft / "model.safetensors").exists()
    # Its own earlier output is replaced whole; a file the user added to it is not deleted.
    out = tmp_path / "exit"
    assert run(capsys, "export-exit", "--draft", trained_draft, "--exit", 3, "--out", out)[0] == 0
    assert run(capsys, "export-exit", "--draft", trained_draft, "--exit", 1, "--out", out)[0] == 0
    assert load_model(out).cfg.num_layers == 1
    (out / "README.md").write_text("my model card")
    code, _, err = run(capsys, "export-exit", "--draft", trained_draft, "--exit", 3, "--out", out)
    assert code == 2 and "also holds README.md" in one_line_error(err, "export-exit")
    assert (out / "README.md").read_text() == "my model card"


def test_an_output_that_is_a_symbolic_link_stays_one(capsys, trained_draft, tmp_path):
    scratch = tmp_path / "scratch" / "exit"
    scratch.mkdir(parents=True)
    link = tmp_path / "exit"
    link.symlink_to(scratch)  # runs/ -> /scratch/...: the link is the user's
    for e in (1, 3):
        assert run(capsys, "export-exit", "--draft", trained_draft, "--exit", e, "--out", link)[0] == 0
    assert link.is_symlink() and load_model(scratch).cfg.num_layers == 3


def test_a_failed_export_leaves_nothing(trained_draft, tmp_path, monkeypatch):
    from s2d.train import export

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        export.export_exit(trained_draft, 1, tmp_path / "exit")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


def test_train_draft_never_writes_over_the_users_files(capsys, checkpoints, train_src, tmp_path):
    users = tmp_path / "my-model"
    shutil.copytree(checkpoints["draft"], users)  # config.json, model.safetensors, tokenizer.json, ...
    init = tmp_path / "init"
    shutil.copytree(checkpoints["target"], init)
    before, init_before = snapshot(users), snapshot(init)
    for out, message in ((users, "is not a train-draft run (it has no train_config.json): it holds config.json"),
                         (init, "is also --init"), (train_src, "is also --data"), (tmp_path, "holds --init")):
        code, _, err = run(capsys, *train_args(init, train_src, out))
        assert code == 2 and message in one_line_error(err, "train-draft"), message
    assert snapshot(users) == before and snapshot(init) == init_before

# ---- 2. non-finite numbers never pass as success: train-draft -------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--lr", "inf"], "argument --lr: expected a finite number, got 'inf'"),
    (["--grad-clip", "nan"], "argument --grad-clip: expected a finite number, got 'nan'"),
    (["--seed", "1e20"], "argument --seed: expected an integer"),
])
def test_train_draft_refuses_non_finite_flags(capsys, checkpoints, train_src, tmp_path, flags, message):
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in train_args(checkpoints["target"], train_src, tmp_path / "run", *flags)])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_config_refuses_non_finite_numbers(checkpoints, train_src, tmp_path):
    from s2d.train import DataConfig, TrainConfig

    base = dict(out_dir=tmp_path / "run", data=DataConfig(paths=(train_src,), seq_len=8), exits=(1,),
                init=checkpoints["target"])
    for field, value in (("lr", float("inf")), ("grad_clip", float("nan")), ("on_policy_temperature", float("inf"))):
        with pytest.raises(ValueError, match=f"{field} must be a finite number"):
            TrainConfig(**base, **{field: value})


def test_train_draft_refuses_an_init_with_nan_weights(capsys, copy_of, train_src, tmp_path):
    init = copy_of()
    edit_weights(init, lambda s: s["model.norm.weight"].__setitem__(0, float("nan")))
    code, out, err = run(capsys, *train_args(init, train_src, tmp_path / "run"))
    assert code == 2 and out == "" and "model.norm.weight holds NaN" in one_line_error(err, "train-draft")
    assert not (tmp_path / "run").exists()


def test_training_stops_at_the_first_non_finite_loss(capsys, checkpoints, train_src, tmp_path, monkeypatch):
    from s2d.train import trainer

    real = trainer._accumulate_gradients
    calls = []

    def nan_at_step_3(*args, **kwargs):
        sums = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            sums[-1] = float("nan")
        return sums

    monkeypatch.setattr(trainer, "_accumulate_gradients", nan_at_step_3)
    out = tmp_path / "run"
    code, stdout, err = run(capsys, *train_args(checkpoints["target"], train_src, out, "--steps", 5, "--save-every", 1))
    line = one_line_error(err, "train-draft")
    assert code == 2 and stdout == "" and "diverged at step 3" in line and "step-00000002, is kept" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert not (out / "model.safetensors").exists()  # nothing exported
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "diverged" and all(math.isfinite(r["loss"]) for r in log if "loss" in r)

# ---- 4. a failed run leaves no trace that blocks its fix -------------------------------------------

@pytest.mark.parametrize("bad", [["--seq-len", "1000"], ["--batch-size", "4000", "--micro-batch-size", "2"],
                                 ["--exits", "1,9"]])
def test_a_refused_run_writes_nothing_and_its_fix_runs(capsys, checkpoints, train_src, tmp_path, bad):
    out = tmp_path / "run"
    code, _, err = run(capsys, *train_args(checkpoints["target"], train_src, out, *bad))
    assert code == 2 and one_line_error(err, "train-draft")
    assert not out.exists()
    code, stdout, _ = run(capsys, *train_args(checkpoints["target"], train_src, out))
    assert code == 0 and json.loads(stdout)["status"] == "completed"


def test_a_run_that_never_checkpointed_is_restarted_with_the_new_settings(capsys, checkpoints, train_src, tmp_path,
                                                                           monkeypatch):
    from s2d.train import trainer

    def diverge(*args, **kwargs):
        return torch.full((5,), float("nan"))

    out = tmp_path / "run"
    monkeypatch.setattr(trainer, "_accumulate_gradients", diverge)
    code, _, err = run(capsys, *train_args(checkpoints["target"], train_src, out, "--lr", "1"))
    assert code == 2 and "no checkpoint was saved" in one_line_error(err, "train-draft")
    monkeypatch.undo()
    code, stdout, _ = run(capsys, *train_args(checkpoints["target"], train_src, out, "--lr", "1e-3"))
    assert code == 0 and json.loads(stdout)["step"] == 2
