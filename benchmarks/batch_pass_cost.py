"""One target pass over the rows of several sequences, against each sequence's own pass.

    python benchmarks/batch_pass_cost.py --zoo ../shared/zoo [--target zoo-l] [--context 400]

Caches prefilled to --context tokens; 1-32 sequences of 1 row (a decode step each) or 4 rows (a chain of 3
draft tokens each); the best of 20 for ``Transformer.run_layers_multi`` and for the same rows as one
``run_layers`` per sequence. bf16, the machine's threads as torch has them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from s2d.bench.results import cpu_name
from s2d.model.llama import SequenceRows
from s2d.model.loading import load_model

SHAPES = ((1, 1), (4, 1), (8, 1), (16, 1), (32, 1), (2, 4), (4, 4), (8, 4), (16, 4))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path("../shared/zoo"))
    ap.add_argument("--target", default="zoo-l")
    ap.add_argument("--context", type=int, default=400)
    args = ap.parse_args()
    if not (args.zoo / args.target).is_dir():
        sys.exit(f"batch_pass_cost: {args.zoo / args.target} not found; pass --zoo DIR")
    target = load_model(args.zoo / args.target, "bfloat16")
    n_ctx = args.context

    def random_ids(n: int, seed: int) -> torch.Tensor:
        return torch.randint(0, target.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))

    caches = []
    with torch.inference_mode():
        for i in range(max(n for n, _ in SHAPES)):
            cache = target.new_cache()
            target.run_layers(target.embed_tokens(random_ids(n_ctx, i)[None]), torch.arange(n_ctx), cache)
            caches.append(cache)

    def best_ms(fn, reps: int = 20) -> float:
        best = float("inf")
        for _ in range(reps):
            for cache in caches:
                cache.truncate(n_ctx)
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    print(f"{cpu_name()}, {args.target} bf16, context {n_ctx}")
    with torch.inference_mode():
        for nseq, rows in SHAPES:
            seqs = [SequenceRows(target.embed_tokens(random_ids(rows, 100 + i)[None])[0],
                                 torch.arange(n_ctx, n_ctx + rows), caches[i]) for i in range(nseq)]
            one = best_ms(lambda: target.run_layers_multi(seqs))
            alone = best_ms(lambda: [target.run_layers(s.hidden[None], s.positions, s.cache) for s in seqs])
            print(f"{nseq:2d} x {rows} rows: one pass {one:6.2f} ms, each alone {alone:6.2f} ms "
                  f"({alone / one:4.2f}x), {one / (nseq * rows):5.2f} ms a row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
