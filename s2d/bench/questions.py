"""Spec-Bench questions (``question_id``, ``category``, ``turns``) and multi-turn prompt assembly."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from s2d.bench.errors import BenchError

# Between a previous answer and the next user turn when the tokenizer has no chat template.
TURN_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]  # user turns; each is answered before the next is asked


def load_questions(path: Path, categories: Sequence[str] | None = None,
                   limit_per_category: int | None = None) -> list[Question]:
    """Read a question.jsonl; keep the given categories (in file order), the first N of each."""
    if not path.is_file():
        raise BenchError(f"question file {path} not found (pass --questions, e.g. "
                         "../shared/data/spec_bench/question.jsonl)")
    questions: list[Question] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["turns"]
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
                raise ValueError("'turns' must be a non-empty list of strings")
            questions.append(Question(row["question_id"], str(row["category"]), tuple(turns)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise BenchError(f"{path}:{lineno}: not a Spec-Bench question ({err!r})") from err
    if not questions:
        raise BenchError(f"{path} holds no questions")
    ids = [q.question_id for q in questions]
    if len(set(ids)) != len(ids):
        raise BenchError(f"{path}: question_id values repeat")
    present = list(dict.fromkeys(q.category for q in questions))
    if categories:
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise BenchError(f"unknown categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                             f"{path.name} has: {', '.join(present)}")
        questions = [q for q in questions if q.category in set(categories)]
    if limit_per_category is not None:
        if limit_per_category < 1:
            raise BenchError(f"--limit-per-category must be >= 1, got {limit_per_category}")
        seen: dict[str, int] = {}
        kept = []
        for q in questions:
            seen[q.category] = seen.get(q.category, 0) + 1
            if seen[q.category] <= limit_per_category:
                kept.append(q)
        questions = kept
    return questions


class PromptBuilder:
    """Token ids of the prompt for turn i: the earlier turns, each followed by the model's own answer.

    With a chat template the conversation is rendered as messages (answers as decoded text, as
    Spec-Bench does). Without one, it is plain concatenation at the token level:
    ``turn_1 answer_1 "\\n\\n" turn_2 ...`` where each answer keeps the exact ids the model produced,
    so a single-turn prompt is exactly its text (what a code-completion suite needs).
    """

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.special = set(tokenizer.all_special_ids)

    def build(self, turns: Sequence[str], answers: Sequence[list[int]]) -> list[int]:
        """Prompt for turn ``len(answers)``; ``answers[j]`` are the new token ids of turn j."""
        i = len(answers)
        if not 0 <= i < len(turns):
            raise ValueError(f"{len(answers)} answers for {len(turns)} turns")
        if self.chat:
            messages = []
            for j in range(i):
                messages.append({"role": "user", "content": turns[j]})
                text = self.tok.decode(answers[j], skip_special_tokens=True).strip()
                messages.append({"role": "assistant", "content": text})
            messages.append({"role": "user", "content": turns[i]})
            rendered = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # The template writes its own BOS and special markers.
            return self.tok(rendered, add_special_tokens=False).input_ids
        ids = list(self.tok(turns[0]).input_ids)
        for j in range(i):
            answer = list(answers[j])
            while answer and answer[-1] in self.special:  # a trailing EOS ended the answer; not content
                answer.pop()
            ids += answer + self.tok(TURN_SEPARATOR + turns[j + 1], add_special_tokens=False).input_ids
        return ids


def fit_context(prompt: list[int], budget: int) -> tuple[list[int], bool]:
    """Keep the last ``budget`` tokens (the text the answer continues); returns (ids, truncated)."""
    if budget < 1:
        raise BenchError("no room for a prompt: the context is too short for --max-new-tokens")
    return (prompt[-budget:], True) if len(prompt) > budget else (prompt, False)


def cut_prompt(text: str, limit: int) -> str:
    """At most ``limit`` characters, cut at the last line end within them (a whole-line prompt, as an editor
    sends); a text without one there is cut at ``limit``. ``limit`` <= 0: uncut."""
    if limit <= 0 or len(text) <= limit:
        return text
    end = text.rfind("\n", 0, limit)  # the line end is kept: at most limit characters in all
    return text[:end + 1] if end > 0 else text[:limit]


def spread(items: list, n: int | None) -> list:
    """``n`` items evenly spaced over the list (its order kept); all of them when n is None or >= len."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]
