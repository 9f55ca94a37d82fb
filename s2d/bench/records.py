"""Raw measurements: one record per target x method x question, one entry per turn."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TurnRecord:
    prompt_tokens: int  # prompt length fed to the method (after any truncation)
    tokens: list[int]  # new token ids
    elapsed_s: float  # median over repeats of the whole generate call
    target_passes: int | None  # None: the method cannot count them
    proposed_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    exit_counts: dict[int, int] = field(default_factory=dict)
    truncated: bool = False  # the prompt lost its head to fit the context
    draft_s: float | None = None  # of elapsed_s: proposing drafts (our engine only)
    verify_s: float | None = None  # of elapsed_s: target passes after the prefill (our engine only)


@dataclass
class QuestionRecord:
    target: str
    method: str
    question_id: int | str
    category: str
    turns: list[TurnRecord]
    greedy_identical: bool | None = None  # all turns token-identical to the baseline's; None = not greedy / no baseline

    @property
    def new_tokens(self) -> int:
        return sum(len(t.tokens) for t in self.turns)

    @property
    def elapsed_s(self) -> float:
        return sum(t.elapsed_s for t in self.turns)

    @property
    def tokens_per_s(self) -> float:
        """Spec-Bench's per-question speed: all turns' new tokens over all turns' time."""
        return self.new_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def outputs(self) -> list[list[int]]:
        return [t.tokens for t in self.turns]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for t in d["turns"]:
            t["exit_counts"] = {str(k): v for k, v in t["exit_counts"].items()}  # JSON keys are strings
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "QuestionRecord":
        turns = [TurnRecord(**{**t, "exit_counts": {int(k): v for k, v in t["exit_counts"].items()}})
                 for t in d["turns"]]
        return cls(d["target"], d["method"], d["question_id"], d["category"], turns, d.get("greedy_identical"))
