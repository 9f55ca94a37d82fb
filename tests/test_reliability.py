"""Issue 17: nothing of the user's is lost, nothing non-finite passes as success, every bad input gets
a clear error. One section per class of the issue; each test failed before the fix."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from s2d.cli import main
from s2d.drafting.model import ModelDrafter
from s2d.engine import Engine, EngineBusyError, InputError
from s2d.model.config import CheckpointError
from s2d.model.loading import load_model, load_tokenizer
from s2d.model.tiny import write_random_checkpoint
from s2d.sampling import SamplingParams, probabilities


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, command: str) -> str:
    """The CLI's error output: exactly one line, ``s2d COMMAND: error: ...``, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"s2d {command}: error: "), err
    return lines[0]


def edit_weights(path, edit) -> None:
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def copy_of(tmp_path, checkpoints):
    def make(name: str = "target", as_name: str | None = None):
        out = tmp_path / (as_name or f"copy-{name}")
        shutil.copytree(checkpoints[name], out)
        return out
    return make


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A little training text (tiny runs: seq_len 8, batches of 2)."""
    path = tmp_path_factory.mktemp("data") / "src"
    path.mkdir()
    for i in range(3):
        (path / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    return path


def train_args(init, src, out, *extra):
    return ["train-draft", "--init", init, "--exits", "1,3", "--data", src, "--out", out, "--seq-len", 8,
            "--steps", 2, "--batch-size", 2, "--micro-batch-size", 2, "--no-autocast", "--save-dtype", "float32",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def sorted_draft(tmp_path_factory, checkpoints, src):
    out = tmp_path_factory.mktemp("sorted") / "draft"
    assert main([str(a) for a in train_args(checkpoints["target"], src, out)]) == 0
    return out


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. no data loss -----------------------------------------------------------------------------

def test_export_exit_never_writes_over_the_users_files(capsys, sorted_draft, tmp_path):
    users = tmp_path / "mine"
    (users / "sub").mkdir(parents=True)
    (users / "notes.txt").write_text("my notes")
    (users / "sub" / "data.csv").write_text("a,b\n")
    a_file = tmp_path / "report.txt"
    a_file.write_text("keep me")
    before = snapshot(users)
    for out, message in ((users, "is not empty and is not an earlier export-exit output: it holds notes.txt, sub"),
                         (a_file, "is a file, not a folder"), (sorted_draft, "is also --draft")):
        code, _, err = run(capsys, "export-exit", "--draft", sorted_draft, "--exit", 1, "--out", out)
        assert code == 2 and message in one_line_error(err, "export-exit")
    assert snapshot(users) == before and a_file.read_text() == "keep me"
    assert (sorted_draft / "model.safetensors").exists()
    # Its own earlier output is replaced whole; a file the user added to it is not deleted.
    out = tmp_path / "exit"
    assert run(capsys, "export-exit", "--draft", sorted_draft, "--exit", 3, "--out", out)[0] == 0
    assert run(capsys, "export-exit", "--draft", sorted_draft, "--exit", 1, "--out", out)[0] == 0
    assert load_model(out).cfg.num_layers == 1
    (out / "README.md").write_text("my model card")
    code, _, err = run(capsys, "export-exit", "--draft", sorted_draft, "--exit", 3, "--out", out)
    assert code == 2 and "also holds README.md" in one_line_error(err, "export-exit")
    assert (out / "README.md").read_text() == "my model card"


def test_an_output_that_is_a_symbolic_link_stays_one(capsys, sorted_draft, tmp_path):
    scratch = tmp_path / "scratch" / "exit"
    scratch.mkdir(parents=True)
    link = tmp_path / "exit"
    link.symlink_to(scratch)  # runs/ -> /scratch/...: the link is the user's
    for e in (1, 3):
        assert run(capsys, "export-exit", "--draft", sorted_draft, "--exit", e, "--out", link)[0] == 0
    assert link.is_symlink() and load_model(scratch).cfg.num_layers == 3


def test_a_failed_export_leaves_nothing(sorted_draft, tmp_path, monkeypatch):
    from s2d.train import export

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        export.export_exit(sorted_draft, 1, tmp_path / "exit")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


def test_train_draft_never_writes_over_the_users_files(capsys, checkpoints, src, tmp_path):
    users = tmp_path / "my-model"
    shutil.copytree(checkpoints["draft"], users)  # config.json, model.safetensors, tokenizer.json, ...
    init = tmp_path / "init"
    shutil.copytree(checkpoints["target"], init)
    before, init_before = snapshot(users), snapshot(init)
    for out, message in ((users, "is not a train-draft run (it has no train_config.json): it holds config.json"),
                         (init, "is also --init"), (src, "is also --data"), (tmp_path, "holds --init")):
        code, _, err = run(capsys, *train_args(init, src, out))
        assert code == 2 and message in one_line_error(err, "train-draft"), message
    assert snapshot(users) == before and snapshot(init) == init_before


# ---- 2. non-finite numbers never pass as success: train-draft -------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--lr", "inf"], "argument --lr: expected a finite number, got 'inf'"),
    (["--grad-clip", "nan"], "argument --grad-clip: expected a finite number, got 'nan'"),
    (["--seed", "1e20"], "argument --seed: expected an integer"),
])
def test_train_draft_refuses_non_finite_flags(capsys, checkpoints, src, tmp_path, flags, message):
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in train_args(checkpoints["target"], src, tmp_path / "run", *flags)])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_config_refuses_non_finite_numbers(checkpoints, src, tmp_path):
    from s2d.train import DataConfig, TrainConfig

    base = dict(out_dir=tmp_path / "run", data=DataConfig(paths=(src,), seq_len=8), exits=(1,),
                init=checkpoints["target"])
    for field, value in (("lr", float("inf")), ("grad_clip", float("nan")), ("on_policy_temperature", float("inf"))):
        with pytest.raises(ValueError, match=f"{field} must be a finite number"):
            TrainConfig(**base, **{field: value})


def test_train_draft_refuses_an_init_with_nan_weights(capsys, copy_of, src, tmp_path):
    init = copy_of()
    edit_weights(init, lambda s: s["model.norm.weight"].__setitem__(0, float("nan")))
    code, out, err = run(capsys, *train_args(init, src, tmp_path / "run"))
    assert code == 2 and out == "" and "model.norm.weight holds NaN" in one_line_error(err, "train-draft")
    assert not (tmp_path / "run").exists()


def test_training_stops_at_the_first_non_finite_loss(capsys, checkpoints, src, tmp_path, monkeypatch):
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
    code, stdout, err = run(capsys, *train_args(checkpoints["target"], src, out, "--steps", 5, "--save-every", 1))
    line = one_line_error(err, "train-draft")
    assert code == 2 and stdout == "" and "diverged at step 3" in line and "step-00000002, is kept" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert not (out / "model.safetensors").exists()  # nothing exported
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "diverged" and all(math.isfinite(r["loss"]) for r in log if "loss" in r)


# ---- 2. non-finite numbers never pass as success: generate, the engine -----------------------------

def test_generate_refuses_a_checkpoint_with_nan_weights(capsys, copy_of):
    path = copy_of()
    edit_weights(path, lambda s: s["model.layers.1.mlp.down_proj.weight"].fill_(float("nan")))
    code, out, err = run(capsys, "generate", "--target", path, "--prompt", "hi", "--max-new-tokens", 4)
    assert code == 2 and out == ""
    assert "model.layers.1.mlp.down_proj.weight holds NaN" in one_line_error(err, "generate")


def test_engine_refuses_nan_logits(checkpoints):
    # One bad value the load-time sample could miss: it spreads to every logit, and the pass's check sees it.
    target = load_model(checkpoints["target"], dtype="float32")
    with torch.no_grad():
        target.layers[0].down.weight[3, 5] = float("nan")
    target.drop_native()
    with pytest.raises(CheckpointError, match="NaN or inf logits"):
        Engine(target, eos_token_ids=()).generate([1, 2, 3], SamplingParams(), 4)
    draft = load_model(checkpoints["target"], dtype="float32")
    with torch.no_grad():
        draft.norm.fill_(float("inf"))
    draft.drop_native()
    sane = load_model(checkpoints["target"], dtype="float32")
    with pytest.raises(CheckpointError, match="draft model computed NaN"):
        Engine(sane, ModelDrafter(draft), 3, eos_token_ids=()).generate([1, 2, 3], SamplingParams(1.0, seed=0), 4)


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


# ---- 4. a failed run leaves no trace that blocks its fix -------------------------------------------

@pytest.mark.parametrize("bad", [["--seq-len", "1000"], ["--batch-size", "4000", "--micro-batch-size", "2"],
                                 ["--exits", "1,9"]])
def test_a_refused_run_writes_nothing_and_its_fix_runs(capsys, checkpoints, src, tmp_path, bad):
    out = tmp_path / "run"
    code, _, err = run(capsys, *train_args(checkpoints["target"], src, out, *bad))
    assert code == 2 and one_line_error(err, "train-draft")
    assert not out.exists()
    code, stdout, _ = run(capsys, *train_args(checkpoints["target"], src, out))
    assert code == 0 and json.loads(stdout)["status"] == "completed"


def test_a_run_that_never_checkpointed_is_restarted_with_the_new_settings(capsys, checkpoints, src, tmp_path,
                                                                           monkeypatch):
    from s2d.train import trainer

    def diverge(*args, **kwargs):
        return torch.full((5,), float("nan"))

    out = tmp_path / "run"
    monkeypatch.setattr(trainer, "_accumulate_gradients", diverge)
    code, _, err = run(capsys, *train_args(checkpoints["target"], src, out, "--lr", "1"))
    assert code == 2 and "no checkpoint was saved" in one_line_error(err, "train-draft")
    monkeypatch.undo()
    code, stdout, _ = run(capsys, *train_args(checkpoints["target"], src, out, "--lr", "1e-3"))
    assert code == 0 and json.loads(stdout)["step"] == 2


# ---- 5. no tracebacks ----------------------------------------------------------------------------

def test_checkpoint_with_zero_layers(capsys, copy_of):
    path = copy_of()
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 0
    (path / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "generate", "--target", path, "--prompt", "x")
    assert code == 2 and "num_hidden_layers must be >= 1, got 0" in one_line_error(err, "generate")


def test_tiny_temperature_is_greedy_not_nan():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.5, -1.0]])
    for t in (1e-40, 1e-50, 1e-300):
        p = probabilities(logits, SamplingParams(temperature=t))
        assert torch.isfinite(p).all()
        assert p[0].tolist() == [0.0, 1.0, 0.0] and p[1].tolist() == [0.5, 0.5, 0.0]


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "tpu", "meta"])
def test_unusable_devices_are_refused_by_every_command(capsys, checkpoints, sorted_draft, src, tmp_path, device):
    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has CUDA")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["x"]}) + "\n")
    commands = {
        "generate": ["--target", checkpoints["target"], "--prompt", "x"],
        "calibrate": ["--target", checkpoints["target"], "--draft", sorted_draft, "--prompts", prompts,
                      "--out", tmp_path / "cal.json"],
        "bench": ["--target", checkpoints["target"], "--methods", "ar", "--questions", questions,
                  "--out", tmp_path / "bench"],
        "train-draft": train_args(checkpoints["target"], src, tmp_path / "run")[1:],
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
def test_a_malformed_calibration_names_the_file_and_the_field(capsys, checkpoints, sorted_draft, tmp_path,
                                                              entry, message):
    draft = tmp_path / "draft"
    shutil.copytree(sorted_draft, draft)
    (draft / "s2d_calibration.json").write_text(json.dumps({"draft": entry}))
    code, _, err = run(capsys, "generate", "--target", f"draft={draft}", "--draft", draft, "--prompt", "x",
                       "--max-new-tokens", 2)
    line = one_line_error(err, "generate")
    assert code == 2 and str(draft / "s2d_calibration.json") in line and message in line


def test_ctrl_c_during_start_up_exits_quietly(capsys, checkpoints, monkeypatch):
    import s2d.loading

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(s2d.loading, "load_family", interrupted)
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
def test_calibrate_refuses_a_bad_limit(capsys, checkpoints, sorted_draft, tmp_path, flags, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def f(x):")
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--target", str(checkpoints["target"]), "--draft", str(sorted_draft), "--prompts",
              str(prompts), "--out", str(tmp_path / "cal.json"), *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "cal.json").exists()


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_calibrate_refuses_runs_too_short_to_draft(capsys, checkpoints, sorted_draft, tmp_path, max_new_tokens):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def f(x):")
    code, _, err = run(capsys, "calibrate", "--target", checkpoints["target"], "--draft", sorted_draft, "--prompts",
                       prompts, "--out", tmp_path / "cal.json", "--max-new-tokens", max_new_tokens)
    assert code == 2 and "too short to calibrate" in one_line_error(err, "calibrate")
    assert not (tmp_path / "cal.json").exists()


# ---- 7. the Python API ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(checkpoints):
    return Engine(load_model(checkpoints["target"], dtype="float32"), eos_token_ids=())


@pytest.mark.parametrize("prompt,error,message", [
    ("def f(x):", TypeError, "not text"),
    ([1, 2.5], TypeError, "integer token ids"),
    ([1, True], TypeError, "integer token ids"),
    ({"input_ids": [1, 2]}, TypeError, "not dict"),
    (torch.tensor([1.0, 2.0]), TypeError, "integer token ids"),
    (torch.tensor([[1, 2]]), InputError, "must be 1-D"),
])
def test_engine_refuses_prompts_that_are_not_token_ids(engine, prompt, error, message):
    with pytest.raises(error, match=message):
        engine.generate(prompt, SamplingParams(), 4)


def test_engine_takes_a_list_or_a_1d_tensor(engine):
    assert engine.generate(torch.tensor([5, 6, 7]), SamplingParams(), 4).output == \
        engine.generate([5, 6, 7], SamplingParams(), 4).output


def test_engine_refuses_a_draft_of_another_vocabulary(checkpoints, tmp_path, engine):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)},
                                                                                unk_token="w0")), eos_token="w0")
    other = load_model(write_random_checkpoint(tmp_path / "other", tokenizer=words, num_layers=1), dtype="float32")
    with pytest.raises(ValueError, match="draft vocab_size 300 != target vocab_size 257"):
        Engine(engine.target, ModelDrafter(other))


def test_interleaved_streams_on_one_engine_are_refused(engine):
    params = SamplingParams()
    alone = engine.generate([1, 2, 3], params, 8).output
    first = engine.stream([1, 2, 3], params, 8)
    got = list(next(first))
    second = engine.stream([9, 8, 7], params, 8)
    with pytest.raises(EngineBusyError, match="already decoding"):
        next(second)
    with pytest.raises(EngineBusyError):
        engine.generate([4], params, 2)
    for tokens in first:  # the first sequence goes on, uncorrupted
        got += tokens
    assert got == alone
    # A stream abandoned by its loop (closed) frees the engine.
    for _ in engine.stream([1, 2, 3], params, 8):
        break
    assert engine.generate([1, 2, 3], params, 8).output == alone
    # Manual start/step: a later start takes the cache over; the stale state refuses to step.
    stale = engine.start([1, 2, 3], params, 8)
    engine.start([4, 5], params, 8)
    with pytest.raises(EngineBusyError, match="no longer owns"):
        engine.step(stale)


# ---- 8. a real public checkpoint's first hour (a chat model) -------------------------------------

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def chat_model(copy_of):
    """The tiny target with a chat template, and generation_config.json naming the token its greedy
    answer to the chat prompt starts with as end-of-turn (as instruct models list <|im_end|> there)."""
    path = copy_of(as_name="chat")
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    prompt = "<|system|>Be brief.\n<|user|>hi\n<|assistant|>"
    ids = load_tokenizer(path)(prompt, add_special_tokens=False).input_ids
    first = Engine(load_model(path, dtype="float32"), eos_token_ids=()).generate(ids, SamplingParams(), 1).output[0]
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [first]
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path, ids, first


def test_generate_applies_the_chat_template_and_generation_config_stop_tokens(capsys, chat_model):
    path, ids, first = chat_model
    assert load_model(path).cfg.eos_token_ids == (first,)  # generation_config.json wins over config.json
    code, out, err = run(capsys, "generate", "--target", path, "--chat", "--system", "Be brief.", "--prompt", "hi",
                         "--dtype", "float32", "--json", "--max-new-tokens", 8)
    result = json.loads(out)
    assert code == 0 and result["prompt_tokens"] == len(ids) and result["tokens"] == [first]
    assert "ended its answer at once" in err
    # --ignore-eos runs on to --max-new-tokens (speed runs).
    code, out, _ = run(capsys, "generate", "--target", path, "--system", "Be brief.", "--prompt", "hi",
                       "--dtype", "float32", "--json", "--max-new-tokens", 8, "--ignore-eos")
    assert code == 0 and json.loads(out)["tokens"][0] == first and json.loads(out)["num_new_tokens"] == 8


def test_a_chat_model_ending_at_once_without_chat_gets_a_hint(capsys, chat_model):
    path, _, first = chat_model
    gen = json.loads((path / "generation_config.json").read_text())
    plain = Engine(load_model(path, dtype="float32"), eos_token_ids=()).generate(
        load_tokenizer(path)("hi").input_ids, SamplingParams(), 1).output[0]
    gen["eos_token_id"] = [plain]
    (path / "generation_config.json").write_text(json.dumps(gen))
    code, out, err = run(capsys, "generate", "--target", path, "--prompt", "hi", "--dtype", "float32")
    assert code == 0 and "try --chat" in err


def test_chat_without_a_template_is_refused(capsys, checkpoints):
    code, _, err = run(capsys, "generate", "--target", checkpoints["target"], "--chat", "--prompt", "hi")
    assert code == 2 and "has no chat template" in one_line_error(err, "generate")
