"""Draft training, whole runs: exact resume, DDP = one process, exported exits, kills mid-training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from s2d.cli import main
from s2d.model.config import CheckpointError
from s2d.model.loading import load_model
from s2d.model.tiny import write_random_checkpoint
from s2d.train import DataConfig, TrainConfig, export_exit, train_draft
from s2d.train import checkpoint as ckpt
from s2d.train.draft import SortedDraft, init_from_checkpoint
from s2d.train.trainer import build_optimizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("train_runs")
    src = root / "src"
    src.mkdir()
    for i in range(8):
        body = "".join(f"    if x > {j}:\n        return f{i}(x - {j * i})\n" for j in range(12))
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n{body}    return {i}\n")
    return {"target": checkpoints["target"],  # only read: the runs init from it and check it is left as it was
            "small": write_random_checkpoint(root / "small", num_layers=2, seed=4), "src": src}


def base_config(tiny, out, **kw) -> TrainConfig:
    cfg = dict(out_dir=out, data=DataConfig(paths=(tiny["src"],), seq_len=24), exits=(1, 2, 3), init=tiny["target"],
               steps=4, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=1, save_every=2, progress=False,
               autocast=False, save_dtype="float32")
    cfg.update(kw)
    return TrainConfig(**cfg)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def log_steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "event" not in r]


def test_resume_continues_exactly_where_it_stopped(tiny, tmp_path):
    cfg = base_config(tiny, tmp_path / "full", objective="distill", targets=(tiny["target"], tiny["small"]),
                      ce_weight=0.5, on_policy=0.5, on_policy_tokens=8)
    result = train_draft(cfg)
    assert result.status == "completed" and result.step == 4
    before = load_file(tiny["target"] / "model.safetensors")
    # Stop after step 2: keep only that checkpoint (as a kill right after it would), then resume.
    part = tmp_path / "part"
    shutil.copytree(cfg.out_dir, part)
    shutil.rmtree(part / "checkpoints" / "step-00000004")
    for name in ("model.safetensors", "config.json"):
        (part / name).unlink()
    resumed = train_draft(cfg.with_(out_dir=part))
    assert resumed.step == 4
    full, again = weights(cfg.out_dir), weights(part)
    assert full.keys() == again.keys()
    for k in full:
        assert torch.equal(full[k], again[k]), k
    assert not torch.equal(full["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert log_steps(part) == [1, 2, 3, 4]  # steps after the checkpoint were dropped, then redone once


def test_resume_refuses_a_changed_config(tiny, tmp_path):
    cfg = base_config(tiny, tmp_path / "run", steps=2)
    train_draft(cfg)
    with pytest.raises(ValueError, match="different config.*lr"):
        train_draft(cfg.with_(lr=1e-2))


def test_two_process_ddp_matches_one_process(tiny, tmp_path):
    args = ["train-draft", "--data", str(tiny["src"]), "--init", str(tiny["target"]), "--exits", "1,3",
            "--objective", "distill", "--targets", f"{tiny['target']},{tiny['small']}", "--ce-weight", "0.5",
            "--divergence", "tvd", "--on-policy", "0.5", "--on-policy-tokens", "6", "--seq-len", "24",
            "--steps", "3", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "3e-3", "--warmup-steps", "1",
            "--no-autocast", "--save-dtype", "float32", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "s2d.cli", *args, "--out", str(tmp_path / "one")], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "s2d.cli", *args, "--out", str(tmp_path / "two")], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    init = load_file(tiny["target"] / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k
    moved = max(float((a[k] - init[k]).abs().max()) for k in a if k in init)
    assert moved > 1e-3  # the comparison is not between two untouched copies of the init
    la = [json.loads(x) for x in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in la[:3]] == pytest.approx([r["loss"] for r in lb[:3]], rel=1e-4)
    assert sum(r["on_policy_rows"] for r in la[:3]) > 0  # draft-sampled sequences were part of the batches


def test_exported_exit_gives_the_exit_logits(tiny, tmp_path):
    out = tmp_path / "draft"
    train_draft(base_config(tiny, out, exits=(1, 3), steps=2))
    assert json.loads((out / "config.json").read_text())["s2d_exits"] == [1, 3]
    assert load_model(out).cfg.exits == (1, 3)
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    sorted_draft = SortedDraft(init_from_checkpoint(out, 3), (1, 3)).eval()
    ids = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exit_logits = sorted_draft(ids)
    for e, expected in zip((1, 3), exit_logits):
        code = main(["export-exit", "--draft", str(out), "--exit", str(e), "--out", str(tmp_path / f"exit{e}")])
        assert code == 0
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / f"exit{e}")
        assert type(plain) is LlamaForCausalLM and plain.config.num_hidden_layers == e
        assert "s2d_exits" not in json.loads((tmp_path / f"exit{e}" / "config.json").read_text())
        with torch.no_grad():
            got = plain(ids).logits
        assert torch.allclose(got, expected, atol=1e-4)
        runtime = load_model(tmp_path / f"exit{e}", dtype="float32")
        assert torch.allclose(runtime(ids, torch.arange(12), runtime.new_cache())[0], expected[0], atol=1e-4)
    assert not torch.allclose(exit_logits[0], exit_logits[1], atol=1e-2)
    with pytest.raises(CheckpointError, match="not one of the draft's exits"):
        export_exit(out, 2, tmp_path / "exit2")


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = base_config(tiny, out, steps=2, save_every=1, keep_checkpoints=5)
    train_draft(cfg)
    root = out / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000001", "step-00000002"]
    real_save = torch.save

    def dies_halfway(obj, path, *a, **kw):  # writes a truncated file, then the process "dies"
        real_save(obj, path, *a, **kw)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise KeyboardInterrupt("killed during save")

    draft = SortedDraft(init_from_checkpoint(out, 3), (1, 2, 3))
    opt = build_optimizer(draft, cfg)
    monkeypatch.setattr(ckpt.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 3, draft, opt, {"tokens": 0}, keep=5)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(root).name == "step-00000002"  # the half-written step 3 is invisible
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(root), draft, opt)
    assert state["step"] == 2
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())
    ckpt.clean_partial(root)
    assert not any(p.name.startswith(".") for p in root.iterdir())


def _wait_for_checkpoint(root: Path, proc: subprocess.Popen, at_least: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = ckpt.latest_checkpoint(root)
        if found is not None and int(found.name.split("-")[1]) >= at_least:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


def test_killed_run_resumes_from_its_last_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    steps = 40
    cmd = [sys.executable, "-m", "s2d.cli", "train-draft", "--out", str(out), "--data", str(tiny["src"]),
           "--init", str(tiny["target"]), "--exits", "1,3", "--seq-len", "16", "--steps", str(steps),
           "--batch-size", "2", "--micro-batch-size", "2", "--save-every", "1", "--keep-checkpoints", "3",
           "--no-autocast", "--no-progress"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(out / "checkpoints", proc, at_least=3)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: whatever was being written stays half-written
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    draft = SortedDraft(init_from_checkpoint(tiny["target"], 3), (1, 3))
    opt = build_optimizer(draft, base_config(tiny, out))
    survivors = ckpt.list_checkpoints(out / "checkpoints")
    for path in survivors:  # every visible checkpoint is complete and loads
        assert ckpt.load_checkpoint(path, draft, opt)["step"] == int(path.name.split("-")[1])
    last = int(survivors[-1].name.split("-")[1])
    assert last < steps

    # SIGTERM asks for a clean stop: the run checkpoints the step it is on and exits with 130.
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(out / "checkpoints", proc, at_least=last + 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    stopped = int(ckpt.latest_checkpoint(out / "checkpoints").name.split("-")[1])
    assert last + 2 <= stopped < steps and "resume" in err

    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["step"] == steps
    records = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    resumes = [r["step"] for r in records if r.get("event") == "resume"]
    assert resumes == [last, stopped]
    assert log_steps(out) == list(range(1, steps + 1))  # each step logged exactly once across the three runs
    assert (out / "model.safetensors").exists()
