"""Where a method's drafting time goes: every draft-model call timed, grouped by kind and row count.

    python benchmarks/draft_calls.py --target ../shared/zoo/zoo-l --draft s2d/data/default/draft \
        --questions ../shared/zoo/code_suite.jsonl --limit-per-category 3 [--method s2d] [--draft-window 0]

Generates every question's first turn with ``--method`` (greedy, EOS ignored, after one untimed warm-up
question) and times each call the drafter makes to its model (``drafting.batch``: ``Layers`` runs a range of the
draft's layers over new rows, ``Head`` reads rows out), grouped by kind, layer range and rows: one row (a draft
token), 2-64 (catch-up), over 64 (a prefill of the prompt). The thirteenth session put `s2d`'s drafting time on
catch-up feeds; timed this way, the draft's prefill was most of it (benchmarks/RESULTS.md, fourteenth session).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from s2d.bench.questions import load_questions
from s2d.drafting import batch
from s2d.engine import MultiTargetEngine
from s2d.resolve import choose, load
from s2d.sampling import SamplingParams


def row_bucket(rows: int) -> str:
    return "1" if rows == 1 else "2-64" if rows <= 64 else ">64"


@contextmanager
def timed_calls() -> Iterator[dict[tuple[str, str, str], list[float]]]:
    """While open, every Layers and Head call is timed into {(kind, layers, rows bucket): [calls, rows, seconds]}."""
    stats: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0, 0.0])
    originals = {cls: cls.run for cls in (batch.Layers, batch.Head)}

    def timed(cls):
        def run(call):
            t0 = time.perf_counter()
            result = originals[cls](call)
            layers = f"{call.start}-{call.end - 1}" if cls is batch.Layers else "head"
            entry = stats[(cls.__name__, layers, row_bucket(call.rows))]
            entry[0] += 1
            entry[1] += call.rows
            entry[2] += time.perf_counter() - t0
            return result
        return run

    try:
        for cls in originals:
            cls.run = timed(cls)
        yield stats
    finally:
        for cls, run in originals.items():
            cls.run = run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--questions", type=Path, required=True)
    ap.add_argument("--limit-per-category", type=int, default=3)
    ap.add_argument("--method", default="s2d")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--draft-window", type=int, help="lookup+M: the model drafter's window (default: the method's)")
    args = ap.parse_args(argv)
    if args.limit_per_category < 1 or args.max_new_tokens < 1:
        ap.error("--limit-per-category and --max-new-tokens must be >= 1")
    if args.draft_window is not None and args.draft_window < 0:
        ap.error("--draft-window must be >= 0 (0: the whole context)")
    choice = choose("draft_calls", [f"target={args.target}"], args.draft, args.method, "cpu")
    family = load(choice, "bfloat16")
    options = family.options("target")
    if args.draft_window is not None:
        options = replace(options, draft_window=args.draft_window)
    engine = MultiTargetEngine(family.models, family.draft, family.method, {"target": options}, eos_token_ids=())
    questions = load_questions(args.questions, limit_per_category=args.limit_per_category)
    prompts = [family.tokenizer.encode(q.turns[0]) for q in questions]
    engine.generate("target", prompts[0], SamplingParams(), 16)  # untimed: the runtime built, caches touched
    with timed_calls() as stats:
        t0 = time.perf_counter()
        tokens = sum(len(engine.generate("target", p, SamplingParams(), args.max_new_tokens).output) for p in prompts)
        total = time.perf_counter() - t0
    print(f"{args.method} on {args.target}: {len(prompts)} prompts ({sum(map(len, prompts))} tokens), {tokens} new "
          f"tokens in {total:.2f} s; draft calls:")
    print("| call | layers | rows | calls | rows in all | ms | ms a call | us a row |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, layers, bucket), (calls, rows, seconds) in sorted(stats.items()):
        print(f"| {kind} | {layers} | {bucket} | {calls} | {rows} | {seconds * 1e3:.1f} | {seconds / calls * 1e3:.2f} "
              f"| {seconds / rows * 1e6:.0f} |")
    print(f"draft calls in all: {sum(v[2] for v in stats.values()) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
