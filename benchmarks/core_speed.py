"""Issue 2 benchmark: our runtime and vanilla speculative decoding against transformers.

    python benchmarks/core_speed.py --zoo ../shared/zoo [--limit N] [--out runs/core_speed.json]

Target zoo-l, draft zoo-s, bfloat16, greedy, 128 new tokens, prompts from code_suite.jsonl.
Every method runs on the same prompt before moving to the next prompt, so machine noise spreads
evenly. tokens/s counts the whole generation call (prefill included, loading excluded) for all.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from s2d.drafting.lookup import PromptLookupDrafter
from s2d.drafting.model import ModelDrafter
from s2d.engine import Engine
from s2d.model.llama import CPU_BF16_UPCAST
from s2d.model.loading import load_model, load_tokenizer
from s2d.sampling import SamplingParams


def count_calls(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, required=True, help="the shared zoo directory (../shared/zoo)")
    ap.add_argument("--target", default="zoo-l")
    ap.add_argument("--draft", default="zoo-s")
    ap.add_argument("--limit", type=int, default=0, help="first N prompts only (0 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--num-draft-tokens", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    suite = args.zoo / "code_suite.jsonl"
    if not suite.exists():
        sys.exit(f"core_speed: {suite} not found; pass --zoo pointing at the shared zoo directory")
    prompts = [json.loads(line)["turns"][0] for line in suite.read_text().splitlines() if line.strip()]
    prompts = prompts[: args.limit or None]
    tpath, dpath = args.zoo / args.target, args.zoo / args.draft
    tok = load_tokenizer(tpath)
    target, draft = load_model(tpath, dtype="bfloat16"), load_model(dpath, dtype="bfloat16")
    hf_target = AutoModelForCausalLM.from_pretrained(tpath, dtype=torch.bfloat16).eval()
    hf_draft = AutoModelForCausalLM.from_pretrained(dpath, dtype=torch.bfloat16).eval()
    hf_calls = count_calls(hf_target)
    n = args.max_new_tokens
    engines = {"ar": Engine(target, None, eos_token_ids=()),
               "sd": Engine(target, ModelDrafter(draft), args.num_draft_tokens, eos_token_ids=()),
               "pld": Engine(target, PromptLookupDrafter(), args.num_draft_tokens, eos_token_ids=())}

    def hf_run(ids: list[int], **kw) -> tuple[list[int], float, int]:
        x = torch.tensor([ids])
        hf_calls[0] = 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf_target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0, **kw)
        return out[0, len(ids):].tolist(), time.perf_counter() - t0, hf_calls[0]

    totals = {m: {"tokens": 0, "seconds": 0.0, "passes": 0, "identical": 0} for m in
              ("ar", "sd", "pld", "hf-ar", "hf-assisted")}
    # Warm-up: first calls pay one-off allocation and kernel selection costs.
    warm = tok(prompts[0]).input_ids
    for engine in engines.values():
        engine.generate(warm, SamplingParams(), 16)
    hf_run(warm[:64])
    for text in tqdm(prompts, desc="prompts"):
        ids = tok(text).input_ids
        reference = None
        for name, engine in engines.items():
            state = engine.generate(ids, SamplingParams(), n)
            reference = reference or state.output
            t = totals[name]
            t["tokens"] += len(state.output)
            t["seconds"] += state.stats.elapsed_s
            t["passes"] += state.stats.target_passes
            t["identical"] += state.output == reference
        for name, kw in (("hf-ar", {}), ("hf-assisted", {"assistant_model": hf_draft})):
            out, seconds, calls = hf_run(ids, **kw)
            t = totals[name]
            t["tokens"] += len(out)
            t["seconds"] += seconds
            t["passes"] += calls
            t["identical"] += out == reference
    rows = {}
    for name, t in totals.items():
        rows[name] = {"tokens_per_s": t["tokens"] / t["seconds"], "mean_accepted_tokens": t["tokens"] / t["passes"],
                      "greedy_identical": t["identical"] / len(prompts)}
    for name in rows:
        base = rows["hf-ar" if name.startswith("hf") else "ar"]["tokens_per_s"]
        rows[name]["speedup_over_own_ar"] = rows[name]["tokens_per_s"] / base
    rows["ar"]["vs_hf_ar"] = rows["ar"]["tokens_per_s"] / rows["hf-ar"]["tokens_per_s"]
    rows["sd"]["vs_hf_assisted"] = rows["sd"]["tokens_per_s"] / rows["hf-assisted"]["tokens_per_s"]
    report = {"target": args.target, "draft": args.draft, "prompts": len(prompts), "max_new_tokens": n,
              "num_draft_tokens": args.num_draft_tokens, "dtype": "bfloat16", "threads": torch.get_num_threads(),
              "machine": {"cpu": platform.processor() or platform.machine(), "native_bf16": not CPU_BF16_UPCAST},
              "methods": rows}
    print("| method | tokens/s | speedup vs own plain | MAT | greedy identical to ar |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['speedup_over_own_ar']:.2f}x | "
              f"{r['mean_accepted_tokens']:.2f} | {r['greedy_identical']:.0%} |")
    print(f"ours/hf plain: {rows['ar']['vs_hf_ar']:.2f}x; ours sd / hf assisted: {rows['sd']['vs_hf_assisted']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # runs/ by default: records stay out of the tree
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
