"""Issue 17, a real public checkpoint's first hour: a chat model's template and stop tokens, and hints."""

from __future__ import annotations

import json

import pytest
from clitools import one_line_error, run

from s2d.engine import Engine
from s2d.model.loading import load_model, load_tokenizer
from s2d.sampling import SamplingParams

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
