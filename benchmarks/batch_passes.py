"""Where a many-row pass of the native runtime goes, by phase: one sequence (a prefill's or a verification's
block) and batches of sequences (a serving step), at a fixed context.

    python benchmarks/batch_passes.py [--model ../shared/zoo/zoo-l] [--reps 30]
        [--single 400x1,400x16,600x48] [--batches 8x6,32x2] [--context 600] [--caches cloned|shared]

Per configuration: the milliseconds of one pass (``run_layers`` / ``run_layers_multi`` over every layer, no
head) and of each phase the runtime profiles (qkv, kv_write, attention, o, gate_up, down), the median of
``--reps`` passes after two warm-up passes. A batch ``NxR`` is N sequences of R new rows each, every one after
``--context`` cached tokens. ``--caches cloned`` (default) gives each sequence its own copy of one prefilled
cache, so a step reads N caches from DRAM as a server's does (32 zoo-l sequences of 600 tokens: ~530 MB of
keys and values, against 105 MB of weights); ``shared`` has every sequence read the same cache, which then
stays in L3: the attention's arithmetic without its memory traffic.

To compare two versions of the code in one session (the host's speed drifts 2-3x between minutes), run them
alternately: ``PYTHONPATH=/tmp/old python benchmarks/batch_passes.py ...`` after
``git archive OLD s2d | tar -x -C /tmp/old``; each tree builds its own runtime.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from s2d.bench.results import cpu_name
from s2d.model.loading import load_model


def timed(runtime, fn, reps: int) -> tuple[float, dict[str, float]]:
    fn()
    fn()
    times, parts = [], {}
    for _ in range(reps):
        runtime.profile(True)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        for k, v in runtime.profile(False).items():
            parts.setdefault(k, []).append(v)
    return 1000 * statistics.median(times), {k: 1000 * statistics.median(v) for k, v in parts.items()}


@torch.inference_mode()
def prefilled(model, context: int, extra: int, seed: int):
    cache = model.new_cache(capacity=context + extra)
    ids = torch.randint(0, model.cfg.vocab_size, (1, context + extra), generator=torch.Generator().manual_seed(seed))
    model(ids[:, :context], torch.arange(context), cache, logits_at=None)
    return cache, model.embed_tokens(ids[:, context:])


@torch.inference_mode()
def single(model, context: int, rows: int, reps: int):
    runtime = model.native_runtime()
    cache, hidden = prefilled(model, context, rows, 0)
    positions = torch.arange(context, context + rows)

    def step() -> None:
        cache.truncate(context)
        runtime.run_layers(hidden, positions, cache, context, 0, model.cfg.num_layers, None)
    return timed(runtime, step, reps)


@torch.inference_mode()
def batch(model, sequences: int, rows: int, context: int, reps: int, caches: str):
    runtime = model.native_runtime()
    cache, hidden = prefilled(model, context, rows, 0)
    every = [cache if caches == "shared" or i == 0 else copy.deepcopy(cache) for i in range(sequences)]
    hidden = hidden[0].repeat(sequences, 1)
    positions = torch.arange(context, context + rows).repeat(sequences)

    def step() -> None:
        for c in every:
            c.truncate(context)
        runtime.run_layers_multi(hidden, positions, every, [rows] * sequences, [context] * sequences,
                                 [None] * sequences, 0, model.cfg.num_layers)
    return timed(runtime, step, reps)


def pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="../shared/zoo/zoo-l")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--single", default="400x1,400x16,600x48", help="CONTEXTxROWS, one sequence")
    ap.add_argument("--batches", default="8x6,32x2", help="SEQUENCESxROWS, each after --context tokens")
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--caches", choices=["cloned", "shared"], default="cloned")
    args = ap.parse_args()
    model = load_model(args.model, dtype=torch.bfloat16)
    if model.native_runtime() is None:
        raise SystemExit("batch_passes: no native runtime on this machine")
    print(f"CPU: {cpu_name()}; runtime {model.native_runtime().isa}; {args.model}; caches {args.caches}")
    runs = [(f"1 sequence, {r} rows after {c}", lambda c=c, r=r: single(model, c, r, args.reps))
            for c, r in pairs(args.single)]
    runs += [(f"{n} sequences x {r} rows after {args.context}",
              lambda n=n, r=r: batch(model, n, r, args.context, args.reps, args.caches))
             for n, r in pairs(args.batches)]
    for name, run in runs:
        total, parts = run()
        print(f"{name:34s} {total:7.2f} ms  " + "  ".join(f"{k} {v:.2f}" for k, v in parts.items() if v))


if __name__ == "__main__":
    main()
