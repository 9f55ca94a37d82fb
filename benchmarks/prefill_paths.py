"""Prefill on the native runtime (passes of ``prefill_rows`` rows) against torch's, interleaved in one process.

    python benchmarks/prefill_paths.py --model ../shared/zoo/zoo-l [--tokens 300,1000] [--rounds 3] [--whole] [--warm]
    python benchmarks/prefill_paths.py --model s2d/data/default/draft --whole    # as a draft prefills

Seconds to prefill each of ``--tokens`` random prompts, the runtime's passes then torch's in each round (the order
alternating from round to round); the model is admitted to the runtime's prefill whatever its width and
instruction set (``native.PREFILL_MAX_WIDTH`` and ``AMX_PREFILL_MAX_WIDTH`` are what this measures). Hold the
instruction set with ``S2D_NATIVE_ISA`` and ``ONEDNN_MAX_CPU_ISA``.

- By default a prompt is prefilled as the engine prefills a target's (``decode.prefill``: chunks of
  ``PREFILL_CHUNK`` tokens); ``--whole``: in one call of all its rows, as a draft prefills the prompt at its first
  model-drafted step.
- torch's products run on oneDNN, which builds a kernel for every new product shape: a prompt length it has not
  met costs more the first time. By default each round adds one token to every length, so each prefill meets a new
  length, as a user's prompts do; ``--warm`` repeats the same lengths (after an untimed warm-up), which compares
  the kernels once built (benchmarks/RESULTS.md, fourteenth session).
"""

from __future__ import annotations

import argparse
import time

import torch

from s2d.bench.results import cpu_name
from s2d.decode import prefill
from s2d.model import native
from s2d.model.config import CheckpointError
from s2d.model.loading import load_model
from s2d.sampling import SamplingParams


def prompt_lengths(text: str) -> list[int]:
    """``--tokens``: comma-separated prompt lengths, each >= 2 (a prefill runs all tokens but the last)."""
    try:
        lengths = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 2:
        raise argparse.ArgumentTypeError(f"every length must be at least 2, got {text!r}")
    return lengths


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, got {text!r}")
    return int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=prompt_lengths, default="300,1000", help="comma-separated prompt lengths")
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--whole", action="store_true", help="one call of the whole prompt (a draft's prefill)")
    ap.add_argument("--warm", action="store_true", help="the same lengths every round (torch's kernels built once)")
    args = ap.parse_args()
    lengths = args.tokens
    native.PREFILL_MAX_WIDTH = native.AMX_PREFILL_MAX_WIDTH = 1 << 30
    try:
        model = load_model(args.model, "bfloat16")
    except (CheckpointError, OSError) as err:
        raise SystemExit(f"prefill_paths: {err}") from None
    runtime = model.native_runtime()
    rows = runtime.prefill_rows if runtime is not None else 0
    if rows == 0:
        raise SystemExit("prefill_paths: the runtime does not prefill here (no runtime, or unpacked weights)")
    if max(lengths) + args.rounds + 1 > model.cfg.max_positions:
        raise SystemExit(f"prefill_paths: --tokens up to {model.cfg.max_positions - args.rounds - 1} for this model")
    cache = model.new_cache()

    def seconds(prefill_rows: int, n: int) -> float:
        runtime.prefill_rows = prefill_rows
        ids = torch.randint(0, model.cfg.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(n)).tolist()
        cache.truncate(0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if args.whole:
                model.run_layers(model.embed_tokens(torch.tensor([ids[:n]])), torch.arange(n), cache)
            else:
                prefill(model, ids, SamplingParams(), 1, cache, None, 0)  # all but the last token: n rows
        return time.perf_counter() - t0

    if args.warm:
        for n in lengths:
            seconds(rows, n), seconds(0, n)
    got: dict[str, list[float]] = {"runtime": [], "torch": []}
    for r in range(args.rounds):
        shift = 0 if args.warm else r + 1
        order = [("runtime", rows), ("torch", 0)][::1 if r % 2 == 0 else -1]
        for name, prefill_rows in order:
            got[name].append(sum(seconds(prefill_rows, n + shift) for n in lengths))
    print(f"CPU: {cpu_name()}; runtime {runtime.isa}, {rows}-row passes; {args.model}; "
          f"prompts of {','.join(map(str, lengths))} tokens, "
          f"{'whole' if args.whole else 'in chunks as decode.prefill'}, {'warm' if args.warm else 'new lengths'}")
    tokens = sum(lengths)
    for name, values in got.items():
        print(f"{name:8s} " + ", ".join(f"{tokens / v:.0f}" for v in values) + " tokens/s")
    ratios = sorted(t / r for r, t in zip(got["runtime"], got["torch"]))
    print("runtime / torch speed, round by round (sorted): " + ", ".join(f"{x:.2f}" for x in ratios))


if __name__ == "__main__":
    main()
