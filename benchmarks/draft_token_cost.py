"""What one draft token costs against a target's one-token pass, with the draft's full head and with
heads over its most frequent tokens (the draft_vocab option, s2d_draft_vocab.json beside the draft).

    python benchmarks/draft_token_cost.py --zoo ../shared/zoo --draft s2d/data/default/draft [--target zoo-l]

Median of 300 calls each, context 400 tokens, bf16: exit 1's layer and its head (the argmax and its
probability, as greedy drafting runs them), and the target's greedy one-token pass, back to back.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from s2d.drafting.vocab import load_vocab, subset_head
from s2d.model import native
from s2d.model.loading import load_model


def median_ms(fn, reps: int = 300) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[reps // 2]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--draft", type=Path, required=True)
    ap.add_argument("--target", default="zoo-l")
    ap.add_argument("--context", type=int, default=400)
    args = ap.parse_args()
    for path in (args.zoo / args.target, args.draft):
        if not path.exists():
            sys.exit(f"draft_token_cost: {path} not found")
    draft, target = load_model(args.draft), load_model(args.zoo / args.target)
    ranked = load_vocab(draft.checkpoint_dir, draft.cfg.vocab_size)
    ctx = args.context
    ids = torch.randint(0, draft.cfg.vocab_size, (1, ctx + 1), generator=torch.Generator().manual_seed(0))
    draft_cache, target_cache = draft.new_cache(num_layers=1), target.new_cache()
    draft.run_layers(draft.embed_tokens(ids[:, :ctx]), torch.arange(ctx), draft_cache, 0, 1)
    target(ids[:, :ctx], torch.arange(ctx), target_cache, logits_at=None)
    pos = torch.arange(ctx, ctx + 1)

    def target_pass():
        target_cache.truncate(ctx)
        target.greedy(ids[:, ctx:], pos, target_cache)

    heads = {"full": None}
    if ranked is not None:
        heads.update({str(n): subset_head(draft, ranked[:n])[0] for n in (4096, 2048, 1024)})
    costs = {}
    for name, head in heads.items():
        def token(head=head):
            draft_cache.truncate(ctx)
            h = draft.run_layers(draft.embed_tokens(ids[:, ctx:]), pos, draft_cache, 0, 1)
            draft.top1(h[0, -1], head)

        costs[name] = median_ms(token)
    one = median_ms(target_pass)
    print(f"native runtime: {native.isa_kind()}; {args.target} one-token pass {one:.2f} ms")
    for name, ms in costs.items():
        print(f"exit-1 draft token, head {name}: {ms:.3f} ms = {ms / one:.3f} of the pass")


if __name__ == "__main__":
    main()
