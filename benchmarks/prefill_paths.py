"""Prefill on the native runtime (passes of ``prefill_rows`` rows) against torch's, interleaved in one process.

    python benchmarks/prefill_paths.py --model runs/llama-1b-shape [--tokens 400] [--rounds 3]

Tokens/s of a whole prefill of ``--tokens`` random tokens (bf16), the runtime's passes then torch's in each
round; the model is admitted to the runtime's prefill whatever its width (``native.PREFILL_MAX_WIDTH`` is what
this measures: ``AMX_PREFILL_MAX_WIDTH`` with AMX). Hold the instruction set with ``S2D_NATIVE_ISA`` and
``ONEDNN_MAX_CPU_ISA``. Each round prefills the same length, so torch's kernels for it are built once, in the
warm-up: this compares warm kernels (a new prompt length costs torch more: RESULTS.md, fourteenth session).
"""

from __future__ import annotations

import argparse
import time

import torch

from s2d.bench.results import cpu_name
from s2d.model import native
from s2d.model.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    native.PREFILL_MAX_WIDTH = native.AMX_PREFILL_MAX_WIDTH = 1 << 30
    model = load_model(args.model, "bfloat16")
    runtime = model.native_runtime()
    rows = runtime.prefill_rows if runtime is not None else 0
    if rows == 0:
        raise SystemExit("prefill_paths: the runtime does not prefill here (no runtime, or unpacked weights)")
    ids = torch.randint(0, model.cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))

    def speed(prefill_rows: int) -> float:
        runtime.prefill_rows = prefill_rows
        cache = model.new_cache(capacity=args.tokens + 1)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(ids, torch.arange(args.tokens), cache, logits_at=None)
        return args.tokens / (time.perf_counter() - t0)

    speed(rows)
    speed(0)
    got: dict[str, list[float]] = {"runtime": [], "torch": []}
    for _ in range(args.rounds):
        got["runtime"].append(speed(rows))
        got["torch"].append(speed(0))
    print(f"CPU: {cpu_name()}; runtime {runtime.isa}, {rows}-row passes; {args.model}; {args.tokens} tokens")
    for name, values in got.items():
        print(f"{name:8s} " + ", ".join(f"{v:.0f}" for v in values) + " tokens/s")


if __name__ == "__main__":
    main()
