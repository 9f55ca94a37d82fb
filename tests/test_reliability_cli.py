"""Issue 17, the command line (generate, bench, calibrate and every command together): every bad checkpoint,
device, number or file gets a one-line error naming it, no traceback, and nothing is stored."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from clitools import edit_weights, one_line_error, run, train_args

from s2d.cli import main

# ---- 2. non-finite numbers never pass as success: generate, the engine -----------------------------

def test_generate_refuses_a_checkpoint_with_nan_weights(capsys, copy_of):
    path = copy_of()
    edit_weights(path, lambda s: s["model.layers.1.mlp.down_proj.weight"].fill_(float("nan")))
    code, out, err = run(capsys, "generate", "--target", path, "--prompt", "hi", "--max-new-tokens", 4)
    assert code == 2 and out == ""
    assert "model.layers.1.mlp.down_proj.weight holds NaN" in one_line_error(err, "generate")

# ---- 3. every checkpoint reader validates ---------------------------------------------------------

@pytest.mark.parametrize("kind,message", [
    ("missing", "lacks tensor 'model.layers.0.self_attn.k_proj.weight'"),
    ("shape", "tensor model.layers.0.self_attn.k_proj.weight has shape (3, 3)"),
    ("truncated", "corrupt or incomplete weights"),
])
def test_every_command_refuses_a_broken_checkpoint(capsys, copy_of, tmp_path, kind, message):
    path = copy_of()
    if kind == "missing":
        edit_weights(path, lambda s: s.pop("model.layers.0.self_attn.k_proj.weight"))
    elif kind == "shape":
        edit_weights(path, lambda s: s.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(3, 3)))
    else:
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    src = tmp_path / "src.txt"
    src.write_text("def f(x):\n    return x\n" * 50)
    commands = {
        "generate": ["--target", path, "--prompt", "x"],
        "export-exit": ["--draft", path, "--exit", "1", "--out", tmp_path / "exit"],
        "train-draft": ["--init", path, "--exits", "1", "--data", src, "--out", tmp_path / "run", "--seq-len", "8",
                        "--steps", "1", "--batch-size", "1", "--micro-batch-size", "1", "--no-progress"],
    }
    for command, args in commands.items():
        code, _, err = run(capsys, command, *args)
        assert code == 2 and message in one_line_error(err, command), command
    assert not (tmp_path / "exit").exists() and not (tmp_path / "run").exists()


def test_folders_in_other_formats_get_a_hint(capsys, tmp_path):
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "model-q4_k_m.gguf").write_bytes(b"GGUF")
    code, _, err = run(capsys, "generate", "--target", tmp_path / "gguf", "--prompt", "x")
    assert code == 2 and "GGUF is llama.cpp's format" in one_line_error(err, "generate")
    code, _, err = run(capsys, "generate", "--target", tmp_path / "gguf" / "model-q4_k_m.gguf", "--prompt", "x")
    assert code == 2 and "GGUF file" in one_line_error(err, "generate")

# ---- 5. no tracebacks ----------------------------------------------------------------------------

def test_checkpoint_with_zero_layers(capsys, copy_of):
    path = copy_of()
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 0
    (path / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "generate", "--target", path, "--prompt", "x")
    assert code == 2 and "num_hidden_layers must be >= 1, got 0" in one_line_error(err, "generate")

@pytest.mark.parametrize("device", ["cuda", "cuda:3", "tpu", "meta"])
def test_unusable_devices_are_refused_by_every_command(capsys, checkpoints, trained_draft, train_src, tmp_path, device):
    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has CUDA")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["x"]}) + "\n")
    commands = {
        "generate": ["--target", checkpoints["target"], "--prompt", "x"],
        "calibrate": ["--target", checkpoints["target"], "--draft", trained_draft, "--prompts", prompts,
                      "--out", tmp_path / "cal.json"],
        "bench": ["--target", checkpoints["target"], "--methods", "ar", "--questions", questions,
                  "--out", tmp_path / "bench"],
        "train-draft": train_args(checkpoints["target"], train_src, tmp_path / "run")[1:],
    }
    for command, args in commands.items():
        code, _, err = run(capsys, command, *args, "--device", device)
        line = one_line_error(err, command)
        assert code == 2 and device in line and "can use: cpu" in line, command
    assert not any(tmp_path.glob("cal.json")) and not (tmp_path / "bench").exists() and not (tmp_path / "run").exists()


def test_bench_checks_its_output_before_running(capsys, checkpoints, tmp_path, monkeypatch):
    from s2d.bench import runner

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["def f("]}) + "\n")
    (tmp_path / "results").write_text("a file")
    monkeypatch.setattr(runner, "run_bench", lambda *a, **k: pytest.fail("the benchmark ran"))
    args = ["bench", "--target", checkpoints["target"], "--methods", "ar", "--questions", questions,
            "--max-new-tokens", 4, "--dtype", "float32", "--no-progress", "--out"]
    code, _, err = run(capsys, *args, tmp_path / "results")
    assert code == 2 and "is a file" in one_line_error(err, "bench")
    monkeypatch.undo()
    # A report step that fails does not lose the measurements.
    from s2d.bench import report

    def broken_plot(*a, **k):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(report, "write_report", broken_plot)
    code, _, err = run(capsys, *args, tmp_path / "out")
    line = one_line_error(err, "bench")
    assert code == 2 and "results are saved" in line and "no fonts" in line
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert (tmp_path / "out" / "records.jsonl").read_text()
    # A temperature transformers' sampler would overflow on is refused before the run, not in the middle.
    code, _, err = run(capsys, *args[:-1], "--methods", "ar,hf-ar", "--temperature", "1e-40", "--out", tmp_path / "t")
    assert code == 2 and "overflows transformers' sampling" in one_line_error(err, "bench")


@pytest.mark.parametrize("flags,message", [
    (["--seed", "100000000000000000000"], "argument --seed: expected an integer in [0, 2**63)"),
    (["--temperature", "nan"], "argument --temperature: expected a finite number"),
    (["--exit-thresholds", "0.5,nan"], "argument --exit-thresholds: expected finite numbers"),
])
def test_out_of_range_numbers_name_the_flag(capsys, checkpoints, flags, message):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--target", str(checkpoints["target"]), "--prompt", "x", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("entry,message", [
    ({"num_draft_tokens": "5"}, "draft.num_draft_tokens must be an integer >= 1, got '5'"),
    ({"exit_thresholds": 0.5}, "draft.exit_thresholds must be a list of numbers in [0, 1]"),
    ({"stop_threshold": None}, "draft.stop_threshold must be a number in [0, 1]"),
    ([3], "'draft' must be a JSON object"),
])
def test_a_malformed_calibration_names_the_file_and_the_field(capsys, checkpoints, trained_draft, tmp_path,
                                                              entry, message):
    draft = tmp_path / "draft"
    shutil.copytree(trained_draft, draft)
    (draft / "s2d_calibration.json").write_text(json.dumps({"draft": entry}))
    code, _, err = run(capsys, "generate", "--target", f"draft={draft}", "--draft", draft, "--prompt", "x",
                       "--max-new-tokens", 2)
    line = one_line_error(err, "generate")
    assert code == 2 and str(draft / "s2d_calibration.json") in line and message in line


def test_ctrl_c_during_start_up_exits_quietly(capsys, checkpoints, monkeypatch):
    import s2d.model.loading

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(s2d.model.loading, "load_family", interrupted)
    code, out, err = run(capsys, "generate", "--target", checkpoints["target"], "--prompt", "x")
    assert code == 130 and out == "" and err == "s2d generate: interrupted\n"
    # The console script reaches main() (and its handler) before torch, which takes seconds to import.
    light = subprocess.run([sys.executable, "-c", "import sys, s2d.cli; print(sorted(m for m in ('torch', "
                            "'transformers') if m in sys.modules))"], capture_output=True, text=True, timeout=60)
    assert light.stdout.strip() == "[]", light.stderr


# ---- 6. calibrate never stores nonsense -----------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--limit", "-1"], "argument --limit: expected an integer in [1,"),
    (["--limit", "0"], "argument --limit: expected an integer in [1,"),
])
def test_calibrate_refuses_a_bad_limit(capsys, checkpoints, trained_draft, tmp_path, flags, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def f(x):")
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--target", str(checkpoints["target"]), "--draft", str(trained_draft), "--prompts",
              str(prompts), "--out", str(tmp_path / "cal.json"), *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "cal.json").exists()


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_calibrate_refuses_runs_too_short_to_draft(capsys, checkpoints, trained_draft, tmp_path, max_new_tokens):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def f(x):")
    code, _, err = run(capsys, "calibrate", "--target", checkpoints["target"], "--draft", trained_draft, "--prompts",
                       prompts, "--out", tmp_path / "cal.json", "--max-new-tokens", max_new_tokens)
    assert code == 2 and "too short to calibrate" in one_line_error(err, "calibrate")
    assert not (tmp_path / "cal.json").exists()
