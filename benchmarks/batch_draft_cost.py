"""Drafting N sequences: one draft pass per level for all (run_together) against each sequence alone (run_alone).

    python benchmarks/batch_draft_cost.py --zoo ../shared/zoo --draft s2d/data/default/draft

The rounds of the two ways interleaved in one process (the host's speed drifts between minutes); the sorted
draft at exit 2 (bf16), greedy, code-suite prompts cut to 1,500 characters entered first; each step adds two
tokens to every context and drafts on top. Median ms per step; every draft has its full length.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from s2d.drafting import SortedConfig, SortedDrafter
from s2d.drafting.batch import run_alone, run_together
from s2d.drafting.length import DraftLength
from s2d.drafting.vocab import load_vocab
from s2d.model.loading import load_model, load_tokenizer
from s2d.sampling import SamplingParams

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--zoo", default="../shared/zoo")
ap.add_argument("--draft", default="s2d/data/default/draft")
args = ap.parse_args()
zoo, draft_dir = args.zoo, args.draft
tok = load_tokenizer(f"{zoo}/zoo-l")
texts = [json.loads(line)["turns"][0][:1500] for line in Path(zoo, "code_suite.jsonl").read_text().splitlines() if line]
contexts = [tok(t).input_ids for t in texts]
draft = load_model(draft_dir, "bfloat16")
ranked = load_vocab(draft_dir, draft.cfg.vocab_size)
greedy = SamplingParams()
for label, vocab, k in (("exit 2, head over 2048 tokens (s2d's model part), 3 tokens", ranked[:2048], 3),
                        ("exit 2, whole head (sd-exit-2), 5 tokens", None, 5)):
    for n in (1, 8, 32):
        ds = [SortedDrafter(draft, SortedConfig((2,)), DraftLength(k), vocab=vocab) for _ in range(n)]
        ctx = [list(c) for c in contexts[:n]]
        with torch.inference_mode():
            for d, c in zip(ds, ctx):  # enter the prompts first: steps then draft on top of a filled cache
                run_alone(d.proposal(c, greedy, None, k))
            times = {"together": [], "alone": []}
            for r in range(12):
                for way in ("together", "alone") if r % 2 else ("alone", "together"):
                    for c in ctx:  # a step's worth of new text
                        c.extend([(len(c) * 31) % 8000 + 1, (len(c) * 17) % 8000 + 1])
                    t0 = time.perf_counter()
                    if way == "together":
                        out = run_together([d.proposal(c, greedy, None, k) for d, c in zip(ds, ctx)])
                    else:
                        out = [run_alone(d.proposal(c, greedy, None, k)) for d, c in zip(ds, ctx)]
                    times[way].append(time.perf_counter() - t0)
                    assert all(len(t) == k for t in out)
        a, b = statistics.median(times["alone"]) * 1e3, statistics.median(times["together"]) * 1e3
        print(f"{label}: {n} sequences: alone {a:.1f} ms, together {b:.1f} ms per step ({a / b:.2f}x)", flush=True)
