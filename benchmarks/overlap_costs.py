"""The cost model of overlapped drafting (s2d-overlap): what a target pass and a draft token cost on 1 and 2
native threads, alone and while the other runs concurrently on its own thread.

    flock /tmp/s2d-cpu.lock python benchmarks/overlap_costs.py --zoo ../shared/zoo --draft s2d/data/default/draft \
        --out runs/overlap_costs.json

For each target: one greedy verification pass over 1 and over k new tokens (context 400, bf16); for the
draft: one token through the layers of exit 1, 2, 3 and its head (the s2d default's 2048-token head where
the draft ships a ranking: the argmax and its probability, as greedy drafting runs them). Each is timed
(median) on 1 thread and on 2 threads alone, and on 1 thread while the other side loops concurrently on
another Python thread with 1 native thread (the overlap's split on 2 cores). From these: the bound of
overlap against sequential decoding for a given drafting share (see ``bound`` in the output).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

from s2d.bench.results import cpu_name
from s2d.drafting.vocab import load_vocab, subset_head
from s2d.model import native
from s2d.model.loading import load_model


def median_ms(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[reps // 2]


def timed_beside(fn, other, threads: int, reps: int) -> float:
    """Median ms of ``fn`` on ``threads`` native threads while ``other`` loops in another thread on 1."""
    stop = threading.Event()

    def loop() -> None:
        with torch.inference_mode(), native.threads(1):
            while not stop.is_set():
                other()

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    try:
        with native.threads(threads):
            return median_ms(fn, reps)
    finally:
        stop.set()
        worker.join()


def target_pass(model, context: int, new: int):
    """A greedy pass over ``new`` tokens at ``context`` (the cache truncated back each time)."""
    cache = model.new_cache(capacity=context + 16)
    ids = torch.randint(0, model.cfg.vocab_size, (1, context + new), generator=torch.Generator().manual_seed(0))
    model(ids[:, :context], torch.arange(context), cache, logits_at=None)
    block, pos = ids[:, context:], torch.arange(context, context + new)

    def run() -> None:
        cache.truncate(context)
        model.greedy(block, pos, cache)

    return run


def draft_token(draft, context: int, layers: int, head):
    """One draft token through ``layers`` layers and ``head`` (top-1), as greedy drafting runs it."""
    cache = draft.new_cache(num_layers=layers)
    ids = torch.randint(0, draft.cfg.vocab_size, (1, context + 1), generator=torch.Generator().manual_seed(1))
    draft.run_layers(draft.embed_tokens(ids[:, :context]), torch.arange(context), cache, 0, layers)
    pos = torch.arange(context, context + 1)

    def run() -> None:
        cache.truncate(context)
        h = draft.run_layers(draft.embed_tokens(ids[:, context:]), pos, cache, 0, layers)
        draft.top1(h[0, -1], head)

    return run


def costs(fn, other, reps: int) -> dict[str, float]:
    return {"1 thread": median_ms(fn_on(fn, 1), reps), "2 threads": median_ms(fn_on(fn, 2), reps),
            "1 thread, other side concurrent on 1": timed_beside(fn, other, 1, reps)}


def fn_on(fn, threads: int):
    def run() -> None:
        with native.threads(threads):
            fn()
    return run


def amdahl(t1: float, t2: float, n: int) -> float:
    """Time on n threads from the times on 1 and 2 (serial share f: t2 = t1 (f + (1 - f) / 2))."""
    f = min(max(2 * t2 / t1 - 1, 0.0), 1.0)
    return t1 * (f + (1 - f) / n)


def bound(verify: dict[str, float], draft: dict[str, float]) -> dict:
    """What overlap can win at best (every speculation used), against sequential decoding on the same cores.

    Sequential, a step is D(n) + V(n): draft, then verify, each on all n cores. Overlapped, the target verifies
    on n - 1 cores while the draft drafts on 1, so a step takes at least V(n - 1) beside the draft. With s the
    drafting share of a sequential step: speedup <= 1 / ((1 - s) * V'(n - 1) / V(n)), which is > 1 only when
    s > 1 - V(n) / V'(n - 1) (the break-even share). 4 cores: V(3), V(4) from an Amdahl fit of the measured 1-
    and 2-thread times, slowed by the contention measured on 2 cores.
    """
    v1, v2, v1c = verify["1 thread"], verify["2 threads"], verify["1 thread, other side concurrent on 1"]
    contention = v1c / v1
    out = {"2 cores": {"verify on 1 core beside the draft / on 2 cores": v1c / v2, "break-even drafting share": 1 - v2 / v1c}}
    v3c, v4 = amdahl(v1, v2, 3) * contention, amdahl(v1, v2, 4)
    out["4 cores (Amdahl fit)"] = {"verify on 3 cores beside the draft / on 4 cores": v3c / v4,
                                   "break-even drafting share": 1 - v4 / v3c,
                                   "draft token on 1 core / on 4 cores": draft["1 thread"] / amdahl(draft["1 thread"], draft["2 threads"], 4)}
    return out


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--draft", type=Path, required=True)
    ap.add_argument("--targets", default="zoo-s,zoo-m,zoo-l")
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--k", type=int, default=4, help="draft tokens of the k-token pass (a block of k + 1)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if native.library() is None:
        sys.exit("overlap_costs: the native runtime does not run here")
    torch.set_num_threads(2)
    draft = load_model(args.draft)
    ranked = load_vocab(draft.checkpoint_dir, draft.cfg.vocab_size)
    head = subset_head(draft, ranked[:2048])[0] if ranked is not None else None
    ctx, k = args.context, args.k
    drafts = {e: draft_token(draft, ctx, e, head) for e in (1, 2, 3)}
    out: dict = {"cpu": cpu_name(), "isa": native.isa_kind(), "cores": torch.get_num_threads(), "context": ctx, "k": k,
                 "draft_head": "2048 most frequent tokens" if head is not None else "full", "targets": {}}
    for name in args.targets.split(","):
        target = load_model(args.zoo / name)
        one, block = target_pass(target, ctx, 1), target_pass(target, ctx, k + 1)
        row: dict = {"pass 1 token (ms)": costs(one, drafts[2], args.reps),
                     f"pass {k + 1} tokens (ms)": costs(block, drafts[2], args.reps)}
        for e, fn in drafts.items():
            row[f"draft token exit {e} (ms)"] = costs(fn, block, args.reps)
        row["bound"] = bound(row[f"pass {k + 1} tokens (ms)"], row["draft token exit 2 (ms)"])
        out["targets"][name] = row
        print(json.dumps({name: row}, indent=1), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # runs/ by default: records stay out of the tree
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
