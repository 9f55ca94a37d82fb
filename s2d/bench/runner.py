"""The timed loop: every target, every question, every method, each turn fed its own earlier answers.

Methods run one after another on the same question before the next question starts, so slow drifts
of a shared machine spread over all methods instead of penalising whichever ran last. The baseline
(``ar``) runs first on each question so the greedy agreement of the others can be checked.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from s2d.bench.errors import BenchError
from s2d.bench.methods import tokenizer
from s2d.bench.metrics import BASELINE, mark_greedy_identical
from s2d.bench.questions import PromptBuilder, Question, fit_context, load_questions
from s2d.bench.records import QuestionRecord, TurnRecord
from s2d.bench.registry import (Runner, MethodContext, MethodOptions, MethodSkipped, ModelStore, build_method,
                                parse_methods, resolve)
from s2d.model.config import ModelConfig
from s2d.model.loading import resolve_checkpoint
from s2d.sampling import SamplingParams


@dataclass(frozen=True)
class BenchConfig:
    targets: tuple[Path, ...]
    methods: tuple[str, ...]
    questions: Path
    draft: Path | None = None
    categories: tuple[str, ...] | None = None
    limit_per_category: int | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0  # sampled runs: question i, turn j uses seed + 64 * i + j
    warmup: int = 1  # questions run (untimed) per target and method before measuring
    repeats: int = 1  # timed runs per turn; the median time counts
    options: MethodOptions = MethodOptions()

    def __post_init__(self) -> None:
        if not self.targets:
            raise BenchError("give at least one --target")
        if self.max_new_tokens < 1:
            raise BenchError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.warmup < 0 or self.repeats < 1:
            raise BenchError("--warmup must be >= 0 and --repeats >= 1")
        if self.options.num_draft_tokens is not None and self.options.num_draft_tokens < 1:
            raise BenchError("--num-draft-tokens must be >= 1")
        try:  # the sampling numbers generate and the server refuse, refused before any model loads
            self.sampling(0, 0)
        except ValueError as err:
            raise BenchError(str(err)) from None
        # Raises a clear BenchError for unknown methods and draft methods without --draft.
        parse_methods(",".join(self.methods), self.draft is not None)
        if 0 < self.temperature < 1e-20 and any(m.startswith("hf-") for m in self.methods):
            # transformers divides float32 logits by T: they overflow to inf and its sampler fails mid-run.
            raise BenchError(f"--temperature {self.temperature:g} overflows transformers' sampling (the hf-* "
                             "methods); use 0 for greedy or a temperature >= 1e-20")

    def sampling(self, question_index: int, turn: int) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed + 64 * question_index + turn)


@dataclass
class Skipped:
    target: str
    method: str
    reason: str


@dataclass
class BenchOutcome:
    records: list[QuestionRecord] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    target_names: dict[str, str] = field(default_factory=dict)  # display name -> path


def display_names(paths: tuple[Path, ...]) -> list[str]:
    """Directory names (``zoo-l``), or the full paths if two targets share a name."""
    names = [p.name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    if len(set(names)) < len(names):
        raise BenchError("the same --target is given twice")
    return names


def context_budget(cfg: BenchConfig, target: Path) -> int:
    """Prompt tokens that fit: the shortest context among the models in play, minus the answer."""
    paths = [target] + ([cfg.draft] if cfg.draft and any(resolve(m)[0].needs_draft for m in cfg.methods) else [])
    context = min(ModelConfig.from_file(resolve_checkpoint(p) / "config.json").max_positions for p in paths)
    return context - cfg.max_new_tokens


def run_conversation(method: Runner, builder: PromptBuilder, question: Question, cfg: BenchConfig,
                     index: int, budget: int) -> list[TurnRecord]:
    turns: list[TurnRecord] = []
    for j in range(len(question.turns)):
        prompt, truncated = fit_context(builder.build(question.turns, [t.tokens for t in turns]), budget)
        params = cfg.sampling(index, j)
        runs = [method.generate(prompt, params, cfg.max_new_tokens) for _ in range(cfg.repeats)]
        first = runs[0]  # the conversation continues with the first answer (all equal when greedy)
        turns.append(TurnRecord(len(prompt), first.tokens, statistics.median(g.elapsed_s for g in runs),
                                first.target_passes, first.proposed_at, first.accepted_at, first.exit_counts,
                                truncated, first.draft_s, first.verify_s))
    return turns


def run_bench(cfg: BenchConfig, progress: bool = True) -> BenchOutcome:
    questions = load_questions(cfg.questions, cfg.categories, cfg.limit_per_category)
    names = display_names(cfg.targets)
    for path in (*cfg.targets, *([cfg.draft] if cfg.draft else [])):
        resolve_checkpoint(path)  # a missing checkpoint fails now, not after an hour of other targets
    # Baseline first on every question: the others' greedy agreement is checked against it.
    methods = sorted(cfg.methods, key=lambda m: m != BASELINE)
    outcome = BenchOutcome(target_names={n: str(p) for n, p in zip(names, cfg.targets)})
    models = ModelStore()
    bar = tqdm(total=len(cfg.targets) * len(questions) * len(methods), desc="bench", unit="q",
               disable=not progress, dynamic_ncols=True)
    for name, path in zip(names, cfg.targets):
        ctx = MethodContext(path, cfg.draft, cfg.options, models)
        budget = context_budget(cfg, path)
        builder = PromptBuilder(tokenizer(ctx, path))
        built: dict[str, Runner] = {}
        for m in methods:
            bar.set_postfix_str(f"{name}: loading {m}")
            try:
                built[m] = build_method(m, ctx)
            except MethodSkipped as why:
                outcome.skipped.append(Skipped(name, m, str(why)))
                bar.write(f"s2d bench: {name}: skipping {m}: {why}", file=sys.stderr)
                bar.update(len(questions))
        for m, method in built.items():
            bar.set_postfix_str(f"{name}: warm-up {m}")
            for i, q in enumerate(questions[: cfg.warmup]):
                prompt, _ = fit_context(builder.build(q.turns[:1], []), budget)
                method.generate(prompt, cfg.sampling(i, 0), cfg.max_new_tokens)
        for i, q in enumerate(questions):
            for m, method in built.items():
                bar.set_postfix_str(f"{name} {m} {q.category}")
                turns = run_conversation(method, builder, q, cfg, i, budget)
                outcome.records.append(QuestionRecord(name, m, q.question_id, q.category, turns))
                bar.update(1)
        del built
        models.release(path)
    bar.close()
    if cfg.temperature == 0:
        mark_greedy_identical(outcome.records)
    return outcome
