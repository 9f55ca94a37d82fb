"""Choose what ``--method s2d`` means by measurement, on prompts the benchmark never uses.

    python benchmarks/choose_default.py --zoo ../shared/zoo --draft s2d/data/default/draft \
        --prompts benchmarks/calibration/stdlib_heldout.jsonl,benchmarks/calibration/third_party.jsonl \
        --out runs/choose_default.json

Every candidate configuration (a method of ``s2d.drafting.methods`` and its knobs) decodes every
calibration prompt on every target, greedy, bf16, ignoring EOS, all candidates on one prompt before the
next prompt (machine noise spreads evenly). A candidate's score on a target is its tokens/s over the
best of the fixed exits (``sd-exit-E``) and ``pld`` there; the default is the candidate with the
highest worst-target score (the issue's goal: ``s2d`` >= every fixed exit and >= ``pld`` on every
target). The calibration prompts: held-out standard-library files cut with another seed than the
code suite, and third-party packages that ``foreign_code.jsonl`` does not use (``benchmarks/calibration``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from s2d.drafting import DraftOptions, build_drafter, engine_draft_tokens, sorted_exits
from s2d.engine import Engine
from s2d.model import native
from s2d.model.loading import load_model, load_tokenizer
from s2d.sampling import SamplingParams


def candidates(exits: tuple[int, ...], lengths: tuple[int, ...]) -> list[tuple[str, DraftOptions]]:
    out = [("ar", DraftOptions()), ("pld", DraftOptions()), ("lookup", DraftOptions())]
    for k in lengths:
        opts = DraftOptions(num_draft_tokens=k)
        for model in [f"sd-exit-{e}" for e in exits] + ["s2d-softmax", "s2d-gate"]:
            out += [(model, opts), (f"lookup+{model}", opts)]
    return out


def parse_candidates(text: str) -> list[tuple[str, DraftOptions]]:
    """``method[:key=value,...];...`` -> candidates, e.g. ``lookup;lookup+sd-exit-2:num_draft_tokens=3``."""
    out = []
    for spec in filter(None, (x.strip() for x in text.split(";"))):
        method, _, knobs = spec.partition(":")
        values = {}
        for kv in filter(None, knobs.split(",")):
            key, _, value = kv.partition("=")
            values[key] = float(value) if "." in value else int(value)
        out.append((method, DraftOptions(**values)))
    return out


def label(method: str, options: DraftOptions) -> str:
    changed = {k: v for k, v in asdict(options).items() if v != asdict(DraftOptions())[k]}
    return method + (" " + ",".join(f"{k}={v}" for k, v in changed.items()) if changed else "")


def read_prompts(paths: list[Path], tokenizer) -> list[list[int]]:
    prompts = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                prompts.append(tokenizer(json.loads(line)["turns"][0]).input_ids)
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--draft", type=Path, required=True)
    ap.add_argument("--targets", default="zoo-s,zoo-m,zoo-l")
    ap.add_argument("--prompts", required=True, help="comma-separated Spec-Bench-format JSONL files")
    ap.add_argument("--lengths", default="3", help="draft lengths tried for model methods")
    ap.add_argument("--candidates", help="instead of the default grid: method[:key=value,...];... (always with ar, pld)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    paths = [Path(p) for p in args.prompts.split(",")]
    for path in [args.draft, *paths, *(args.zoo / t for t in args.targets.split(","))]:
        if not path.exists():
            sys.exit(f"choose_default: {path} not found")
    draft = load_model(args.draft, dtype="bfloat16")
    tokenizer = load_tokenizer(args.draft)
    prompts = read_prompts(paths, tokenizer)
    if args.candidates:
        cands = [("ar", DraftOptions()), ("pld", DraftOptions())] + parse_candidates(args.candidates)
    else:
        cands = candidates(sorted_exits(draft), tuple(int(k) for k in args.lengths.split(",")))
    names = [label(m, o) for m, o in cands]
    results: dict = {"isa": native.isa_kind(), "threads": torch.get_num_threads(), "prompts": [str(p) for p in paths],
                     "num_prompts": len(prompts), "targets": {}}
    for target_name in args.targets.split(","):
        target = load_model(args.zoo / target_name, dtype="bfloat16")
        engines = [Engine(target, build_drafter(m, draft, o, target), engine_draft_tokens(m, o), eos_token_ids=())
                   for m, o in cands]
        speeds: list[list[float]] = [[] for _ in cands]
        mats: list[list[float]] = [[] for _ in cands]
        engines[0].generate(prompts[0], SamplingParams(), 8)  # warm-up (native build, caches)
        for prompt in tqdm(prompts, desc=target_name, unit="prompt"):
            for i, engine in enumerate(engines):
                state = engine.generate(prompt, SamplingParams(), args.max_new_tokens)
                speeds[i].append(len(state.output) / state.stats.elapsed_s)
                mats[i].append(state.stats.mean_accepted_tokens)
        tps = {n: statistics.fmean(s) for n, s in zip(names, speeds)}
        results["targets"][target_name] = {"tokens_per_s": tps,
                                           "mat": {n: statistics.fmean(m) for n, m in zip(names, mats)}}
        del engines, target
    # score: tokens/s over the best fixed exit or pld on the same target; default = best worst-target score
    fixed = [n for n in names if n.startswith("sd-exit-") or n == "pld"]  # the references
    scores = {}
    for n in names:
        if n in ("ar", "pld") or n.startswith("sd-exit-"):
            continue
        scores[n] = min(r["tokens_per_s"][n] / max(r["tokens_per_s"][f] for f in fixed)
                        for r in results["targets"].values())
    # The default is an S2D configuration: it uses the sorted draft (plain lookup is scored for reference).
    best = max((n for n in scores if n != "lookup"), key=scores.get)
    results["scores"] = scores
    results["default"] = {"name": best, "method": cands[names.index(best)][0],
                          "options": asdict(cands[names.index(best)][1])}
    print(f"\n{results['isa']}, {results['threads']} threads, {len(prompts)} calibration prompts, "
          f"{args.max_new_tokens} new tokens; tokens/s (speedup over ar)")
    header = list(results["targets"])
    print("| candidate | " + " | ".join(header) + " | worst-target score |")
    print("|---|" + "---|" * (len(header) + 1))
    for n in names:
        cells = [f"{r['tokens_per_s'][n]:.1f} ({r['tokens_per_s'][n] / r['tokens_per_s']['ar']:.2f}x)"
                 for r in results["targets"].values()]
        print(f"| {n} | " + " | ".join(cells) + f" | {scores[n]:.3f} |" if n in scores else f"| {n} | "
              + " | ".join(cells) + " | |")
    print(f"\ndefault: {best} (score {scores[best]:.3f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # runs/ by default: records stay out of the tree
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"{time.time() - start:.0f} s")
