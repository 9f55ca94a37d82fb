"""Greedy mean accepted tokens (MAT) of every exit of a sorted draft against every zoo target.

    python benchmarks/draft_mat.py --zoo ../shared/zoo --draft s2d/data/default/draft --label distill \
        --exits 1,2,3 --out runs/draft_mat.json
    python benchmarks/draft_mat.py --report runs/draft_mat.json   # markdown tables

Exit E of a draft is ``load_model(draft, num_layers=E)``: its first E layers through the shared final
norm and head, drafting alone (no cascade), 5 tokens per step, 128 new tokens, greedy. The untrained
baseline is the draft's initialisation itself: ``--draft ../shared/zoo/zoo-s`` truncated at each exit.
MAT is pooled over prompts: all new tokens / all target passes (Spec-Bench's definition).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ZOO_TARGETS = ("zoo-s", "zoo-m", "zoo-l")


def pick_prompts(rows: list[dict], n: int) -> list[dict]:
    """n prompts spread evenly over the categories and, within each, evenly over its prompts."""
    cats: dict[str, list[dict]] = {}
    for r in rows:
        cats.setdefault(r["category"], []).append(r)
    names = list(cats)
    picked = []
    for i, name in enumerate(names):
        k = n // len(names) + (1 if i < n % len(names) else 0)
        group = cats[name]
        picked += [group[round(j * len(group) / k)] for j in range(min(k, len(group)))]
    return sorted(picked, key=lambda r: r["question_id"])


def measure(zoo: Path, draft: Path, exits: list[int], targets: list[str], prompts: list[dict],
            num_draft_tokens: int, max_new_tokens: int) -> dict:
    from s2d.drafting.model import ModelDrafter
    from s2d.engine import Engine
    from s2d.model.loading import load_model, load_tokenizer
    from s2d.sampling import SamplingParams

    out: dict = {}
    drafts = {e: load_model(draft, dtype="bfloat16", num_layers=e) for e in exits}
    for name in targets:
        target = load_model(zoo / name, dtype="bfloat16")
        tok = load_tokenizer(zoo / name)
        ids = [tok(p["turns"][0]).input_ids for p in prompts]
        out[name] = {}
        for e in exits:
            engine = Engine(target, ModelDrafter(drafts[e]), num_draft_tokens)
            tokens = passes = 0
            per_prompt = []
            t0 = time.perf_counter()
            for prompt in ids:
                stats = engine.generate(prompt, SamplingParams(), max_new_tokens).stats
                tokens += stats.new_tokens
                passes += stats.target_passes
                per_prompt.append(round(stats.mean_accepted_tokens, 4))
            out[name][str(e)] = {"mat": tokens / passes, "new_tokens": tokens, "target_passes": passes,
                                 "per_prompt": per_prompt, "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{name} exit {e}: MAT {tokens / passes:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return out


def report(results: dict) -> str:
    labels = list(results)
    first = results[labels[0]]
    targets = list(first["mat"])
    lines = []
    for label in labels:
        r = results[label]
        exits = list(r["mat"][targets[0]])
        lines.append(f"**{label}** (`{r['draft']}`, {len(r['question_ids'])} prompts)\n")
        lines.append("| exit | " + " | ".join(targets) + " |")
        lines.append("|---|" + "---|" * len(targets))
        for e in exits:
            lines.append(f"| {e} | " + " | ".join(f"{r['mat'][t][e]['mat']:.3f}" for t in targets) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, help="the zoo directory (../shared/zoo)")
    ap.add_argument("--draft", type=Path)
    ap.add_argument("--label")
    ap.add_argument("--exits", default="1,2,3")
    ap.add_argument("--targets", default=",".join(ZOO_TARGETS))
    ap.add_argument("--num-prompts", type=int, default=20, help="of code_suite.jsonl's 60 (0 = all)")
    ap.add_argument("--num-draft-tokens", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("runs/draft_mat.json"))
    ap.add_argument("--report", type=Path, help="print the markdown tables of a results file and exit")
    args = ap.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0
    if not (args.zoo and args.draft and args.label):
        ap.error("--zoo, --draft and --label are required to measure")
    suite = args.zoo / "code_suite.jsonl"
    if not suite.is_file():
        sys.exit(f"draft_mat.py: {suite} not found; pass --zoo pointing at the shared zoo directory")
    if not (args.draft / "config.json").is_file():
        sys.exit(f"draft_mat.py: no checkpoint at {args.draft}")
    torch.manual_seed(0)
    rows = [json.loads(line) for line in suite.read_text().splitlines() if line.strip()]
    prompts = pick_prompts(rows, args.num_prompts) if args.num_prompts else rows
    exits = [int(e) for e in args.exits.split(",")]
    mat = measure(args.zoo, args.draft, exits, args.targets.split(","), prompts, args.num_draft_tokens,
                  args.max_new_tokens)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.label] = {"draft": str(args.draft), "question_ids": [p["question_id"] for p in prompts],
                           "num_draft_tokens": args.num_draft_tokens, "max_new_tokens": args.max_new_tokens,
                           "mat": mat}
    args.out.parent.mkdir(parents=True, exist_ok=True)  # runs/ by default: records stay out of the tree
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(report({args.label: results[args.label]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
