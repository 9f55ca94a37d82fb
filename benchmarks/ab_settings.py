"""Passes of k rows under the native runtime's settings, alternated in one process.

    python benchmarks/ab_settings.py --model ../shared/zoo/zoo-l --rows 1,6,16 --setting prefetch_rows=4,1
    S2D_NATIVE_ISA=avx2 python benchmarks/ab_settings.py --rows 1,6,16 --setting wide_products=0,1
    S2D_NATIVE_ISA=avx512 python benchmarks/ab_settings.py --rows 1,6,16 --setting fma_products=0,1

The host's speed drifts 2-3x between minutes, so two settings timed in separate runs compare the minutes as
much as the settings. Here every round times each row count under each setting back to back (the order
reversed every other round), and the ratio to the first setting is taken round by round. The settings are the
runtime's own switches, set between passes (``native.prefetch_rows``, ``native.wide_products``,
``native.fma_products``): they change which kernel or hint runs (``fma_products`` also the bits, not the work),
so one model and one cache serve every setting.

Prints, per row count, the median milliseconds of a pass (a greedy pass as the engine runs it, after
``--context`` cached tokens, as ``costs.py`` times it) under each setting, and the median ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from costs import pass_fn, prefilled
from tqdm import tqdm

from s2d.bench.results import cpu_name
from s2d.model import native
from s2d.model.loading import load_model

# What --setting may name: the runtime switch, and how one of its values is read from the command line.
SETTINGS: dict[str, tuple[Callable, Callable[[str], object]]] = {
    "prefetch_rows": (native.prefetch_rows, int),
    "wide_products": (native.wide_products, lambda v: v not in ("0", "false", "off")),
    "fma_products": (native.fma_products, lambda v: v not in ("0", "false", "off")),
}


def parse_setting(text: str) -> tuple[str, list]:
    """``name=v1,v2,...`` -> (name, values), at least two values of a known setting."""
    name, sep, values = text.partition("=")
    if not sep or name not in SETTINGS:
        raise ValueError(f"--setting must be NAME=V1,V2,... with NAME one of {', '.join(SETTINGS)}; got {text!r}")
    parsed = [SETTINGS[name][1](v.strip()) for v in values.split(",") if v.strip()]
    if len(parsed) < 2:
        raise ValueError(f"--setting {name} needs at least two values to compare, got {values!r}")
    return name, parsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="../shared/zoo/zoo-l")
    ap.add_argument("--rows", default="1,6,16", help="rows per pass, comma-separated")
    ap.add_argument("--setting", required=True, help="NAME=V1,V2,...: " + ", ".join(SETTINGS))
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20, help="passes timed per row count, setting and round")
    args = ap.parse_args()
    try:
        name, values = parse_setting(args.setting)
        rows = [int(r) for r in args.rows.split(",")]
        if not all(1 <= r <= native.MAX_ROWS for r in rows):
            raise ValueError(f"--rows must be 1-{native.MAX_ROWS}")
    except ValueError as e:
        sys.exit(f"ab_settings: {e}")
    if native.library() is None:
        sys.exit("ab_settings: the native runtime does not run on this machine")
    switch = SETTINGS[name][0]
    before = switch()
    model = load_model(args.model, dtype=torch.bfloat16)
    cache, ids = prefilled(model, args.context, max(rows))
    passes = {k: pass_fn(model, cache, ids, args.context, k) for k in rows}
    ms: dict[tuple, list[float]] = {(v, k): [] for v in values for k in rows}
    try:
        for r in tqdm(range(args.rounds), desc="rounds", unit="round"):
            for k in rows:
                for v in values if r % 2 == 0 else values[::-1]:
                    switch(v)
                    for _ in range(3):
                        passes[k]()
                    t0 = time.perf_counter()
                    for _ in range(args.reps):
                        passes[k]()
                    ms[(v, k)].append((time.perf_counter() - t0) / args.reps * 1000)
    finally:
        switch(before)
    print(f"{cpu_name()}; native runtime {native.isa_kind()} ({native.product_kind()}); {torch.get_num_threads()} threads; {args.model}; "
          f"context {args.context}; {name} = {', '.join(map(str, values))}; medians of {args.rounds} rounds")
    first = values[0]
    for k in rows:
        cells = [f"{first}: {statistics.median(ms[(first, k)]):.3f} ms"]
        for v in values[1:]:
            ratio = statistics.median(b / a for a, b in zip(ms[(first, k)], ms[(v, k)]))
            cells.append(f"{v}: {statistics.median(ms[(v, k)]):.3f} ms ({ratio:.3f}x)")
        print(f"{k:>3} rows | " + " | ".join(cells))


if __name__ == "__main__":
    main()
