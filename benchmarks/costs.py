"""What bounds speculative speedup here: forward-pass costs of targets and draft exits.

    python benchmarks/costs.py --zoo ../shared/zoo --draft benchmarks/zoo-draft [--context 400] [--out F]

For each target: the time of one decoding pass over 1 new token and over k+1 new tokens (k = 1..8)
at a fixed context length. For the draft: the time of one token through the layers of each exit
plus the shared head. Ratios to the target's 1-token pass are the c of Leviathan et al.:
expected speedup ~ MAT / (1 + k * c) * (t_1 / t_{k+1}).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from s2d.drafting import sorted_exits
from s2d.model.loading import load_model


def timed(fn, reps: int) -> float:
    fn()
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


@torch.inference_mode()
def block_cost(model, context: int, new: int, reps: int, layers: int | None = None) -> float:
    cache = model.new_cache(num_layers=layers)
    ids = torch.randint(0, model.cfg.vocab_size, (1, context + new))
    end = layers or model.cfg.num_layers
    h = model.run_layers(model.embed_tokens(ids[:, :context]), torch.arange(context), cache, 0, end)
    positions = torch.arange(context, context + new)

    def step():
        cache.truncate(context)
        out = model.run_layers(model.embed_tokens(ids[:, context:]), positions, cache, 0, end)
        model.logits(out[:, -1]).argmax()

    return timed(step, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--draft", type=Path, required=True)
    ap.add_argument("--targets", default="zoo-s,zoo-m,zoo-l")
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    for path in [args.zoo, args.draft]:
        if not path.exists():
            sys.exit(f"costs: {path} not found")
    report: dict = {"context": args.context, "dtype": args.dtype, "targets": {}, "draft_exits_ms": {}}
    draft = load_model(args.draft, dtype=args.dtype)
    for e in sorted_exits(draft):
        report["draft_exits_ms"][e] = 1000 * block_cost(draft, args.context, 1, args.reps * 3, layers=e)
    for name in args.targets.split(","):
        target = load_model(args.zoo / name, dtype=args.dtype)
        row = {k: 1000 * block_cost(target, args.context, k, args.reps) for k in (1, 2, 4, 6, 9)}
        report["targets"][name] = row
    print(f"context {args.context} tokens, {args.dtype}, {torch.get_num_threads()} threads; milliseconds per pass")
    print("| target | 1 token | 2 | 4 | 6 | 9 | " + " | ".join(f"draft exit {e} / target 1-token" for e in
                                                         report["draft_exits_ms"]) + " |")
    print("|---" * (6 + len(report["draft_exits_ms"])) + "|")
    for name, row in report["targets"].items():
        ratios = " | ".join(f"{ms / row[1]:.3f}" for ms in report["draft_exits_ms"].values())
        print(f"| {name} | " + " | ".join(f"{row[k]:.2f}" for k in (1, 2, 4, 6, 9)) + f" | {ratios} |")
    print("draft exit cost (ms): " + ", ".join(f"exit {e}: {ms:.2f}" for e, ms in report["draft_exits_ms"].items()))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
