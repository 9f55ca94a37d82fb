"""Where a GPU decode step's time goes: zoo-s bf16, one prompt alone (twice: a shape seen again) and 8 in a
batch, for ar and s2d, each followed by a cProfile of the same work.

    python benchmarks/gpu_profile.py ZOO_DIR [--device cuda] [--draft s2d/data/default/draft]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

from s2d.engine import MultiTargetEngine
from s2d.model.loading import load_model, load_tokenizer
from s2d.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--draft", type=Path, default=Path("s2d/data/default/draft"))
    args = ap.parse_args()
    tok = load_tokenizer(args.zoo / "zoo-s")
    texts = [json.loads(line)["turns"][0][:1500]
             for line in (args.zoo / "code_suite.jsonl").read_text().splitlines() if line][:8]
    prompts = [tok(t).input_ids for t in texts]
    target = load_model(args.zoo / "zoo-s", "bfloat16", device=args.device)
    draft = load_model(args.draft, "bfloat16", device=args.device)
    for method in ("ar", "s2d"):
        engine = MultiTargetEngine({"t": target}, None if method == "ar" else draft, method, eos_token_ids=())
        engine.generate("t", prompts[0], SamplingParams(), 16)
        for _ in range(2):
            t0 = time.perf_counter()
            engine.generate("t", prompts[1], SamplingParams(), 128)
            print(method, "alone", round(128 / (time.perf_counter() - t0), 1), "tok/s", flush=True)
        t0 = time.perf_counter()
        engine.generate_batch("t", prompts, SamplingParams(), 64)
        print(method, "batch 8 x 64", round(8 * 64 / (time.perf_counter() - t0), 1), "tok/s", flush=True)
        for batch in (False, True):
            prof = cProfile.Profile()
            prof.enable()
            if batch:
                engine.generate_batch("t", prompts, SamplingParams(), 32)
            else:
                engine.generate("t", prompts[2], SamplingParams(), 128)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
