"""Per target x method x category summaries of question records (pure arithmetic, no models).

Definitions follow Spec-Bench: a question's speed is its new tokens over its time (all turns);
``tokens_per_s`` is the mean of question speeds; ``speedup`` is a method's ``tokens_per_s`` over the
baseline's (``ar``) on the same target and category. MAT is total new tokens over total target
passes (a ratio of sums, so long answers weigh more, as Spec-Bench's mean over all steps does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from s2d.bench.records import QuestionRecord
from s2d.engine import add_by_position, add_histogram

ALL = "all"  # the category of the summary over every question
BASELINE = "ar"
HF_BASELINE = "hf-ar"


@dataclass
class RunSummary:
    target: str
    method: str
    category: str  # a question category, or ALL
    num_questions: int
    num_turns: int
    new_tokens: int
    elapsed_s: float
    tokens_per_s: float  # mean over questions of (question tokens / question seconds)
    speedup: float | None  # over the baseline on the same target and category; None without one
    speedup_vs_hf_ar: float | None  # over transformers' plain decoding, when it ran
    mean_accepted_tokens: float | None  # tokens per target pass; None if the method cannot count passes
    draft_acceptance_rate: float | None  # accepted / proposed draft tokens; None if nothing was proposed
    acceptance_by_position: list[float] = field(default_factory=list)  # [i]: P(accept | position i proposed)
    exit_histogram: dict[str, int] = field(default_factory=dict)  # exit layer -> draft tokens; sorted drafts only
    # of the decoding time after the prefill, the part spent drafting (the rest verifying); ours only
    draft_share: float | None = None
    greedy_identical: float | None = None  # fraction of questions token-identical to the baseline
    truncated_turns: int = 0  # turns whose prompt was cut to fit the context


def summarize(target: str, method: str, category: str, records: Sequence[QuestionRecord]) -> RunSummary:
    turns = [t for r in records for t in r.turns]
    new_tokens = sum(len(t.tokens) for t in turns)
    passes = [t.target_passes for t in turns]
    mat = new_tokens / sum(passes) if passes and None not in passes and sum(passes) else None  # type: ignore[arg-type]
    proposed: list[int] = []
    accepted: list[int] = []
    exits: dict[int, int] = {}
    for t in turns:
        add_by_position(proposed, t.proposed_at)
        add_by_position(accepted, t.accepted_at)
        add_histogram(exits, t.exit_counts)
    accepted.extend([0] * (len(proposed) - len(accepted)))  # positions proposed but never accepted
    timed = [t for t in turns if t.draft_s is not None and t.verify_s is not None]
    draft_s, verify_s = sum(t.draft_s for t in timed), sum(t.verify_s for t in timed)
    same = [r.greedy_identical for r in records if r.greedy_identical is not None]
    return RunSummary(
        target=target, method=method, category=category, num_questions=len(records), num_turns=len(turns),
        new_tokens=new_tokens, elapsed_s=sum(t.elapsed_s for t in turns),
        tokens_per_s=sum(r.tokens_per_s for r in records) / len(records) if records else 0.0,
        speedup=None, speedup_vs_hf_ar=None, mean_accepted_tokens=mat,
        draft_acceptance_rate=sum(accepted) / sum(proposed) if sum(proposed) else None,
        acceptance_by_position=[a / p if p else 0.0 for a, p in zip(accepted, proposed)],
        exit_histogram={str(e): exits[e] for e in sorted(exits)},
        greedy_identical=sum(same) / len(same) if same else None,
        truncated_turns=sum(t.truncated for t in turns),
        draft_share=draft_s / (draft_s + verify_s) if timed and draft_s + verify_s else None,
    )


def aggregate(records: Sequence[QuestionRecord], method_order: Sequence[str] = ()) -> list[RunSummary]:
    """One summary per target x method x category, plus category ALL.

    Order: targets and categories as first seen, methods as ``method_order`` then as first seen (a
    method skipped on the first target must not sink to the end of every table).
    """
    groups: dict[tuple[str, str, str], list[QuestionRecord]] = {}
    for r in records:
        groups.setdefault((r.target, r.method, r.category), []).append(r)
        groups.setdefault((r.target, r.method, ALL), []).append(r)
    # Targets, methods and categories in first-seen (run / question file) order, ALL last.
    rank: dict[tuple[int, str], int] = {}
    for i, attr in enumerate(("target", "method", "category")):
        seen = [getattr(r, attr) for r in records]
        for j, value in enumerate(dict.fromkeys([*(method_order if attr == "method" else ()), *seen])):
            rank[i, value] = j
    rank[2, ALL] = len(rank)
    keys = sorted(groups, key=lambda k: tuple(rank[i, v] for i, v in enumerate(k)))
    summaries = [summarize(*key, groups[key]) for key in keys]
    speed = {(s.target, s.method, s.category): s.tokens_per_s for s in summaries}
    for s in summaries:
        for base, attr in ((BASELINE, "speedup"), (HF_BASELINE, "speedup_vs_hf_ar")):
            ref = speed.get((s.target, base, s.category))
            if ref:
                setattr(s, attr, s.tokens_per_s / ref)
    return summaries


def mark_greedy_identical(records: Sequence[QuestionRecord]) -> None:
    """Set ``greedy_identical`` of each record against the baseline's record of the same target and question."""
    reference = {(r.target, r.question_id): r.outputs() for r in records if r.method == BASELINE}
    for r in records:
        ref = reference.get((r.target, r.question_id))
        r.greedy_identical = None if ref is None else r.outputs() == ref
