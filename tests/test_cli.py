"""The command line: JSON output, and clear refusals of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from clitools import run
from s2d.cli import main
from s2d.model.tiny import write_random_checkpoint


def test_generate_json(capsys, checkpoints):
    code, out, _ = run(capsys, "generate", "--target", str(checkpoints["target"]), "--draft",
                       str(checkpoints["draft"]), "--prompt", "def f(x):", "--max-new-tokens", "12", "--json",
                       "--dtype", "float32")
    assert code == 0
    result = json.loads(out)
    assert {"text", "tokens", "num_new_tokens", "tokens_per_s", "target_passes", "mean_accepted_tokens"} <= set(result)
    assert result["num_new_tokens"] == len(result["tokens"]) <= 12
    assert result["tokens_per_s"] > 0 and result["target_passes"] >= 1


def test_generate_methods_agree_greedy(capsys, checkpoints, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("abcabcabc")
    outs = {}
    for method in ("ar", "sd", "pld"):
        code, out, _ = run(capsys, "generate", "--target", str(checkpoints["target"]), "--draft",
                           str(checkpoints["draft"]), "--method", method, "--prompt-file", str(prompt),
                           "--max-new-tokens", "16", "--json", "--dtype", "float32")
        assert code == 0
        outs[method] = json.loads(out)["tokens"]
    assert outs["ar"] == outs["sd"] == outs["pld"]


def test_streams_text_without_json(capsys, checkpoints):
    code, out, err = run(capsys, "generate", "--target", str(checkpoints["target"]), "--prompt", "hi",
                         "--max-new-tokens", "5")
    assert code == 0 and "tokens/s" in err and out.endswith("\n")


@pytest.fixture
def broken(tmp_path, checkpoints):
    def make(kind):
        path = tmp_path / kind
        shutil.copytree(checkpoints["target"], path)
        if kind == "corrupt":
            data = (path / "model.safetensors").read_bytes()
            (path / "model.safetensors").write_bytes(data[: len(data) // 2])
        elif kind == "unsupported":
            cfg = json.loads((path / "config.json").read_text())
            cfg["architectures"] = ["GPT2LMHeadModel"]
            (path / "config.json").write_text(json.dumps(cfg))
        elif kind == "bad-json":
            (path / "config.json").write_text("{not json")
        elif kind == "no-weights":
            (path / "model.safetensors").unlink()
        return path
    return make


@pytest.mark.parametrize("kind,message", [
    ("corrupt", "corrupt or incomplete weights"), ("unsupported", "unsupported architecture 'GPT2LMHeadModel'"),
    ("bad-json", "not valid JSON"), ("no-weights", "no model.safetensors"),
])
def test_malformed_checkpoints_are_refused(capsys, broken, kind, message):
    code, _, err = run(capsys, "generate", "--target", str(broken(kind)), "--prompt", "x")
    assert code == 2 and message in err


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--target", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 2 and "is not a directory" in err


def test_draft_with_another_tokenizer_is_refused(capsys, checkpoints, tmp_path):
    vocab = {f"w{i}": i for i in range(257)}
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")),
                                    eos_token="w0")
    draft = write_random_checkpoint(tmp_path / "other", tokenizer=other, num_layers=1)
    code, _, err = run(capsys, "generate", "--target", str(checkpoints["target"]), "--draft", str(draft),
                       "--prompt", "x")
    assert code == 2 and "different tokenizers" in err


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "-1"], "temperature"), (["--top-p", "0"], "top_p"), (["--top-k", "-2"], "top_k"),
    (["--max-new-tokens", "0"], "max_new_tokens"), (["--num-draft-tokens", "0"], "num_draft_tokens"),
])
def test_invalid_values_are_refused(capsys, checkpoints, flags, message):
    code, _, err = run(capsys, "generate", "--target", str(checkpoints["target"]), "--method", "pld",
                       "--prompt", "x", *flags)
    assert code == 2 and message in err


def test_prompt_longer_than_context(capsys, checkpoints):
    code, _, err = run(capsys, "generate", "--target", str(checkpoints["target"]), "--prompt", "a" * 600)
    assert code == 2 and "exceeds the model's context of 512 tokens" in err


def test_sd_needs_a_draft(capsys, checkpoints):
    with pytest.raises(SystemExit, match="needs --draft"):
        main(["generate", "--target", str(checkpoints["target"]), "--method", "sd", "--prompt", "x"])


def test_hub_id_is_tried_and_fails_clearly_offline(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    code, _, err = run(capsys, "generate", "--target", "some-org/some-model", "--prompt", "x")
    assert code == 2 and "neither a local directory nor a reachable hub id" in err
