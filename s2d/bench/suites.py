"""Code suites in Spec-Bench's question format, cut from held-out source files.

Three kinds of prompt, as in the zoo's ``code_suite.jsonl``:
- ``body``: the lines before and including a function's signature and docstring; the model writes the body.
- ``continue``: a run of lines from the middle of a file; the model continues it.
- ``long``: the last few thousand characters before a point of a file (long-context continuation).
Every choice comes from one seeded RNG, so a suite is reproducible from its arguments.
"""

from __future__ import annotations

import ast
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from s2d.bench.errors import BenchError

KINDS = ("body", "continue", "long")


@dataclass(frozen=True)
class SuiteConfig:
    source_root: Path  # the files' relative paths are under here
    files: tuple[str, ...]  # relative paths of the held-out files
    per_kind: int = 20  # prompts of each kind
    kinds: tuple[str, ...] = KINDS
    body_context_lines: int = 40  # lines up to the end of the docstring (or signature)
    continue_lines: int = 30
    long_chars: int = 5000
    max_prompt_tokens: int | None = 1700  # needs a token counter; longer prompts lose leading lines
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise BenchError(f"unknown suite kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
        if self.per_kind < 1 or self.body_context_lines < 1 or self.continue_lines < 1 or self.long_chars < 1:
            raise BenchError("--per-kind and the prompt sizes must be >= 1")


def held_out_files(split: Path) -> tuple[str, ...]:
    """``validation_files`` of a split.json (as the zoo's), or a text file with one path a line."""
    if not split.is_file():
        raise BenchError(f"split file {split} not found (e.g. ../shared/zoo/split.json)")
    text = split.read_text()
    if split.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise BenchError(f"{split} is not valid JSON: {err}") from err
        files = raw.get("validation_files") if isinstance(raw, dict) else raw
        if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
            raise BenchError(f"{split} has no 'validation_files' list of paths")
    else:
        files = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not files:
        raise BenchError(f"{split} lists no files")
    return tuple(files)


TokenCounter = Callable[[str], int]


def fit_tokens(lines: list[str], limit: int | None, count: TokenCounter | None) -> str | None:
    """Drop leading lines until the prompt has at most ``limit`` tokens; None if nothing is left."""
    while lines:
        text = "".join(lines)
        if limit is None or count is None or count(text) <= limit:
            return text
        lines = lines[1:]
    return None


def body_prompt(source: str, cfg: SuiteConfig, rng: random.Random, count: TokenCounter | None) -> str | None:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # e.g. Python 2 test data in the stdlib
        return None
    candidates = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str)
        rest = body[1:] if has_doc else body
        # Prompt ends after the docstring (or the signature); a body must follow on later lines.
        end = body[0].end_lineno if has_doc else body[0].lineno - 1
        if len(rest) >= 2 and end is not None and end >= node.lineno and rest[0].lineno > end:
            candidates.append(end)
    if not candidates:
        return None
    end = rng.choice(sorted(candidates))
    lines = source.splitlines(keepends=True)
    return fit_tokens(lines[max(0, end - cfg.body_context_lines): end], cfg.max_prompt_tokens, count)


def continue_prompt(source: str, cfg: SuiteConfig, rng: random.Random, count: TokenCounter | None) -> str | None:
    lines = source.splitlines(keepends=True)
    k = cfg.continue_lines
    lo, hi = len(lines) // 4, 3 * len(lines) // 4 - k  # the middle half of the file, with text after
    starts = [s for s in range(lo, hi + 1) if sum(bool(x.strip()) for x in lines[s: s + k]) >= k // 2]
    if not starts:
        return None
    s = rng.choice(starts)
    return fit_tokens(lines[s: s + k], cfg.max_prompt_tokens, count)


def long_prompt(source: str, cfg: SuiteConfig, rng: random.Random, count: TokenCounter | None) -> str | None:
    # End at a line end with at least long_chars before it and some of the file left to continue.
    ends = [i + 1 for i, ch in enumerate(source) if ch == "\n" and cfg.long_chars <= i + 1 <= len(source) - 200]
    if not ends:
        return None
    end = rng.choice(ends)
    text = source[end - cfg.long_chars: end]
    lines = text.splitlines(keepends=True)
    return fit_tokens(lines, cfg.max_prompt_tokens, count)


MAKERS = {"body": body_prompt, "continue": continue_prompt, "long": long_prompt}


def make_suite(cfg: SuiteConfig, count: TokenCounter | None = None) -> list[dict]:
    """Rows {question_id, category, source, turns}; fewer than asked if the files run out."""
    rng = random.Random(cfg.seed)
    files = list(cfg.files)
    rng.shuffle(files)
    left = {k: cfg.per_kind for k in cfg.kinds}
    rows: list[dict] = []
    missing = [f for f in files if not (cfg.source_root / f).is_file()]
    if len(missing) == len(files):
        raise BenchError(f"none of the {len(files)} files exist under {cfg.source_root} (check --source-root)")
    for rel in files:
        if not any(left.values()):
            break
        try:
            source = (cfg.source_root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for kind in cfg.kinds:
            if left[kind]:
                prompt = MAKERS[kind](source, cfg, rng, count)
                if prompt and prompt.strip():
                    rows.append({"question_id": len(rows) + 1, "category": kind, "source": rel, "turns": [prompt]})
                    left[kind] -= 1
    return rows


def write_suite(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
