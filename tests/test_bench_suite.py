"""``s2d bench make-suite``: the three prompt kinds, determinism, the token bound, bad input."""

from __future__ import annotations

import ast
import json
import random

import pytest

from s2d.bench.errors import BenchError
from s2d.bench.questions import load_questions
from s2d.bench.suites import SuiteConfig, body_prompt, held_out_files, make_suite
from s2d.cli import main
from s2d.model.tiny import byte_tokenizer


def module_source(seed: int) -> str:
    """A synthetic Python module: functions with and without docstrings, filler lines."""
    rng = random.Random(seed)
    parts = [f'"""Module {seed}."""\n\nimport os\n\n']
    for i in range(30):
        doc = f'    """Return thing {i}."""\n' if i % 2 else ""
        body = "".join(f"    x{j} = {rng.randint(0, 99)} + {j}\n" for j in range(rng.randint(3, 8)))
        parts.append(f"def f{i}(a, b={i}):\n{doc}{body}    return x0\n\n\n")
    return "".join(parts)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    files = ["a.py", "pkg/b.py", "c.py"]
    for i, f in enumerate(files):
        (root / f).write_text(module_source(i))
    (root / "py2.py").write_text("print 'hello'\n" * 400)  # not Python 3: no body prompts, other kinds fine
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"rule": "test", "validation_files": files + ["py2.py", "gone.py"]}))
    return root, split


def test_suite_has_every_kind_and_is_seeded(tmp_path, corpus):
    root, split = corpus
    tok = byte_tokenizer()
    count = lambda text: len(tok(text).input_ids)  # noqa: E731
    cfg = SuiteConfig(root, held_out_files(split), per_kind=3, long_chars=1500, max_prompt_tokens=600, seed=1)
    rows = make_suite(cfg, count)
    assert [sum(r["category"] == k for r in rows) for k in ("body", "continue", "long")] == [3, 3, 3]
    assert make_suite(cfg, count) == rows
    assert make_suite(SuiteConfig(**{**cfg.__dict__, "seed": 2}), count) != rows
    assert [r["question_id"] for r in rows] == list(range(1, 10))
    for r in rows:
        prompt = r["turns"][0]
        assert count(prompt) <= 600 and prompt.endswith("\n")
        # Every prompt is a verbatim slice of its source file.
        assert prompt in (root / r["source"]).read_text()
        if r["category"] == "body":
            last = prompt.rstrip("\n").splitlines()[-1]
            assert last.startswith("def ") or last.strip().startswith('"""'), last
        if r["category"] == "continue":
            assert len(prompt.splitlines()) == cfg.continue_lines
    # Written through the CLI, it is a question file the harness reads.
    out = tmp_path / "suite.jsonl"
    assert main(["bench", "make-suite", "--split", str(split), "--source-root", str(root), "--out", str(out),
                 "--per-kind", "2", "--long-chars", "1500", "--seed", "1"]) == 0
    questions = load_questions(out)
    assert len(questions) == 6 and {q.category for q in questions} == {"body", "continue", "long"}


def test_body_prompt_stops_after_the_docstring_or_signature():
    source = module_source(0)
    tree = ast.parse(source)
    ends = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            first = node.body[0]
            has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            ends.add(first.end_lineno if has_doc else node.lineno)
    cfg = SuiteConfig(source_root=None, files=(), body_context_lines=5)  # type: ignore[arg-type]
    lines = source.splitlines(keepends=True)
    for seed in range(10):
        prompt = body_prompt(source, cfg, random.Random(seed), None)
        end = next(e for e in ends if "".join(lines[max(0, e - 5): e]) == prompt)
        assert lines[end].startswith("    x0 =")  # what follows is the body's first statement


def test_bad_suite_input(tmp_path, corpus):
    root, split = corpus
    with pytest.raises(BenchError, match="not found"):
        held_out_files(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"files": []}')
    with pytest.raises(BenchError, match="validation_files"):
        held_out_files(bad)
    with pytest.raises(BenchError, match="none of the"):
        make_suite(SuiteConfig(tmp_path / "nowhere", held_out_files(split)))
    with pytest.raises(BenchError, match="unknown suite kind"):
        SuiteConfig(root, ("a.py",), kinds=("poems",))
