"""Batched decoding: tokens/s at 1, 4, 8, 16 and 32 sequences, fixed draft lengths against goodput-aware ones.

    python benchmarks/batch_goodput.py --zoo ../shared/zoo --draft s2d/data/default/draft [--target zoo-l]
        [--method s2d] [--batches 1,4,8,16,32] [--max-new-tokens 128] [--device cpu] [--out runs/batch_goodput.json]
        [--prompts-file ../shared/data/foreign_code.jsonl] [--interleave cap1,cap3,cap5,goodput]

Each batch size decodes that many prompts (the code suite's, or ``--prompts-file``'s; cut to --prompt-chars) with
``MultiTargetEngine.generate_batch`` (one target pass per step for every sequence), greedy, every output
checked against the same prompt decoded alone (on the CPU an assertion: rows are bit-identical there; on a
GPU, where cuBLAS picks kernels by shape and bf16 rows may differ in their last bits, a count reported). Three ways per batch size, interleaved: plain decoding
(``ar``), the method with its own fixed draft lengths, and with goodput-aware lengths (``decode_step_batch``'s
default). Prints one JSON document; the machine's CPU is named in it.

``--interleave P1,P2,...`` compares draft-length policies within one batch instead: the batch's decode steps
take the policies in turn (``capK``: every sequence drafts at most K tokens; ``goodput``: the allocation), so
the host's drift, which moves whole runs 2x here, falls on every policy alike; per policy, the tokens its steps
emitted over their seconds (drafting included; the first two turns, with the draft's prompt catch-up, left
out). Prompts: the code suite, or ``--prompts-file`` (Spec-Bench rows), cycled up to the batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from s2d.bench.questions import cut_prompt
from s2d.bench.results import cpu_name
from s2d.drafting import build_drafter
from s2d.engine import MultiTargetEngine
from s2d.goodput import allocate
from s2d.model.loading import load_model, load_tokenizer
from s2d.sampling import SamplingParams


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path("../shared/zoo"))
    ap.add_argument("--draft", type=Path, default=Path("s2d/data/default/draft"))
    ap.add_argument("--target", default="zoo-l")
    ap.add_argument("--method", default="s2d")
    ap.add_argument("--batches", default="1,4,8,16,32")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompt-chars", type=int, default=1500)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--prompts-file", type=Path, default=None, help="Spec-Bench rows (turns[0]); default the code suite")
    ap.add_argument("--interleave", default=None, help="policies taking the steps of one batch in turn: capK, goodput")
    args = ap.parse_args()
    suite = args.prompts_file or args.zoo / "code_suite.jsonl"
    if not suite.is_file():
        sys.exit(f"batch_goodput: {suite} not found; pass --zoo DIR or --prompts-file F")
    policies = args.interleave.split(",") if args.interleave else []
    for policy in policies:
        if policy != "goodput" and not (policy.startswith("cap") and policy[3:].isdigit()):
            sys.exit(f"batch_goodput: unknown policy {policy!r} (capK or goodput)")
    tok = load_tokenizer(args.zoo / args.target)
    texts = [cut_prompt(json.loads(line)["turns"][0], args.prompt_chars) for line in suite.read_text().splitlines()
             if line]
    prompts = [tok(t).input_ids for t in texts]
    prompts = [prompts[i % len(prompts)] for i in range(max(int(b) for b in args.batches.split(",")))]
    target = load_model(args.zoo / args.target, "bfloat16", device=args.device)
    draft = load_model(args.draft, "bfloat16", device=args.device)
    engines = {"ar": MultiTargetEngine({"t": target}, None, "ar", eos_token_ids=()),
               args.method: MultiTargetEngine({"t": target}, draft, args.method, eos_token_ids=())}
    n_max = max(int(b) for b in args.batches.split(","))
    alone = [engines["ar"].generate("t", p, SamplingParams(), args.max_new_tokens).output for p in prompts[:n_max]]
    engines[args.method].generate_batch("t", prompts[:4], SamplingParams(), 16)  # warm-up (and the cost model)
    rows = []
    for n in (int(b) for b in args.batches.split(",")):
        row = {"sequences": n}
        if policies:
            row.update(interleaved(engines[args.method], prompts[:n], alone[:n], policies, args.max_new_tokens))
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        for label, method, goodput in (("ar", "ar", True), ("fixed", args.method, False),
                                       ("goodput", args.method, True)):
            t0 = time.perf_counter()
            states = engines[method].generate_batch("t", prompts[:n], SamplingParams(), args.max_new_tokens,
                                                    goodput=goodput)
            seconds = time.perf_counter() - t0
            same = sum(s.output == a for s, a in zip(states, alone))
            assert same == n or args.device != "cpu", f"{label} at {n}: not the outputs decoded alone"
            passes = sum(s.stats.target_passes for s in states)
            row[label] = {"tokens_per_s": round(sum(len(s.output) for s in states) / seconds, 1),
                          "mean_accepted_tokens": round(sum(len(s.output) for s in states) / passes, 2),
                          "identical_to_alone": same}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"cpu": cpu_name(), "device": args.device, "target": args.target, "method": args.method, "dtype": "bfloat16",
              "max_new_tokens": args.max_new_tokens, "prompt_chars": args.prompt_chars, "prompts": str(suite),
              "interleave": policies or None, "rows": rows}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def interleaved(multi: MultiTargetEngine, prompts: list[list[int]], alone: list[list[int]], policies: list[str],
                max_new_tokens: int) -> dict:
    """One batch whose decode steps take ``policies`` in turn; per policy its steps' tokens/s."""
    chosen: list[str] = []

    def allocation(caps, stats, cost, contexts):  # called once per batched step: this step's policy
        policy = policies[len(chosen) % len(policies)]
        chosen.append(policy)
        if policy == "goodput":
            return allocate(caps, stats, cost, contexts)
        return [min(c, int(policy[3:])) for c in caps]

    engine = multi.engine("t")
    drafters = [build_drafter(multi.method, multi.draft, multi.options["t"], engine.target) for _ in prompts]
    totals = {p: {"steps": 0, "tokens": 0, "seconds": 0.0} for p in policies}
    states: list = []
    seen, last = 0, time.perf_counter()
    for new in engine.stream_batch(prompts, SamplingParams(), max_new_tokens, drafters, states, allocation):
        now = time.perf_counter()
        if len(chosen) > max(seen, 2 * len(policies)):  # a batched step, past the first two turns
            t = totals[chosen[-1]]
            t["steps"] += 1
            t["tokens"] += sum(map(len, new))
            t["seconds"] += now - last
        seen, last = len(chosen), now
    same = sum(s.output == a for s, a in zip(states, alone))
    assert same == len(prompts) or engine.target.device.type != "cpu", "a batch's outputs differ from alone"
    return {"identical_to_alone": same,
            **{p: {**t, "tokens_per_s": round(t["tokens"] / max(t["seconds"], 1e-9), 1)} for p, t in totals.items()}}


if __name__ == "__main__":
    sys.exit(main())
