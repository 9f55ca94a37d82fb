"""Question files, multi-turn prompt assembly, and the method registry's refusals."""

from __future__ import annotations

import json

import pytest

from s2d.bench.errors import BenchError
from s2d.bench.questions import TURN_SEPARATOR, PromptBuilder, fit_context, load_questions
from s2d.bench.registry import parse_methods, resolve
from s2d.model.tiny import byte_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def write_questions(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def qfile(tmp_path):
    return write_questions(tmp_path / "q.jsonl", [
        {"question_id": 1, "category": "writing", "turns": ["a", "b"]},
        {"question_id": 2, "category": "qa", "turns": ["c"], "reference": ["extra fields are fine"]},
        {"question_id": 3, "category": "writing", "turns": ["d", "e"]},
        {"question_id": 4, "category": "qa", "turns": ["f"]},
        {"question_id": 5, "category": "qa", "turns": ["g"]},
    ])


def test_load_filters_categories_and_limits(qfile):
    assert [q.question_id for q in load_questions(qfile)] == [1, 2, 3, 4, 5]
    assert [q.question_id for q in load_questions(qfile, ["qa"])] == [2, 4, 5]
    assert [q.question_id for q in load_questions(qfile, None, 1)] == [1, 2]
    assert [q.question_id for q in load_questions(qfile, ["qa", "writing"], 2)] == [1, 2, 3, 4]
    assert load_questions(qfile)[0].turns == ("a", "b")


def test_load_refuses_bad_input(tmp_path, qfile):
    with pytest.raises(BenchError, match="not found"):
        load_questions(tmp_path / "missing.jsonl")
    with pytest.raises(BenchError, match="unknown category.*poetry.*has: writing, qa"):
        load_questions(qfile, ["poetry"])
    with pytest.raises(BenchError, match=":2:"):
        load_questions(write_questions(tmp_path / "bad.jsonl", [{"question_id": 1, "category": "x", "turns": ["a"]},
                                                                {"question_id": 2, "category": "x"}]))
    with pytest.raises(BenchError, match="repeat"):
        load_questions(write_questions(tmp_path / "dup.jsonl", [{"question_id": 1, "category": "x", "turns": ["a"]}] * 2))
    with pytest.raises(BenchError, match=">= 1"):
        load_questions(qfile, None, 0)


def test_plain_concatenation_keeps_answer_ids():
    tok = byte_tokenizer()
    builder = PromptBuilder(tok)
    assert not builder.chat
    turns = ["Write x.", "Now y."]
    assert builder.build(turns, []) == tok("Write x.").input_ids  # a single turn is exactly its text
    answer = tok(" ok", add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = builder.build(turns, [answer])
    # The answer's own ids follow the first turn; its trailing EOS is dropped; then separator + turn 2.
    assert ids == tok("Write x.").input_ids + answer[:-1] + tok(TURN_SEPARATOR + "Now y.", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "Write x. ok\n\nNow y."
    with pytest.raises(ValueError):
        builder.build(turns, [answer, answer])


def test_chat_template_renders_the_conversation():
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    builder = PromptBuilder(tok)
    assert builder.chat
    assert tok.decode(builder.build(["hi", "more"], [])) == "<user>hi</user><assistant>"
    answer = tok("  hello there ", add_special_tokens=False).input_ids + [tok.eos_token_id]
    text = tok.decode(builder.build(["hi", "more"], [answer]))
    assert text == "<user>hi</user><assistant>hello there</assistant><user>more</user><assistant>"


def test_fit_context_keeps_the_tail():
    assert fit_context([1, 2, 3, 4], 10) == ([1, 2, 3, 4], False)
    assert fit_context([1, 2, 3, 4], 3) == ([2, 3, 4], True)
    with pytest.raises(BenchError):
        fit_context([1], 0)


def test_registry_resolves_patterns_and_refuses_bad_methods():
    spec, params = resolve("sd-exit-12")  # ours come from s2d.drafting.methods, as the CLI builds them
    assert spec.pattern == "sd-exit-12" and params == {} and spec.needs_draft
    assert resolve("ar")[1] == {} and not resolve("lookup")[0].needs_draft and resolve("lookup+s2d-gate")[0].needs_draft
    assert resolve("hf-ar")[0].pattern == "hf-ar"  # a peer, registered in the bench
    for bad in ("sd-exit-", "sd-exit-x", "AR", "medusa", "lookup+pld", "lookup+"):
        with pytest.raises(BenchError, match="unknown method"):
            resolve(bad)
    assert parse_methods("ar, pld,hf-ar", have_draft=False) == ["ar", "pld", "hf-ar"]
    for needs in ("sd", "sd-exit-2", "hf-assisted"):
        with pytest.raises(BenchError, match="--draft"):
            parse_methods(f"ar,{needs}", have_draft=False)
    with pytest.raises(BenchError, match="twice"):
        parse_methods("ar,ar", have_draft=False)
