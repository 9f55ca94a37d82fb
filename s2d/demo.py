"""``s2d demo``: the embedded default family, plain decoding against ``s2d``, then one streamed completion.

Runs offline right after installation: each target of the embedded family (s2d/data/default) decodes
a few held-out prompts with plain decoding and with the default ``s2d``, and a table shows tokens/s,
the speedup, the mean accepted tokens per target pass and the exits the draft's tokens came from
(0: lookup). Greedy outputs must be identical (they are the target's own); the command fails if not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="s2d on the embedded default models: plain decoding vs s2d, then a completion",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts to time (1-4, default 4)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--no-stream", action="store_true", help="skip the streamed completion at the end")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from s2d.drafting import build_drafter, engine_draft_tokens
    from s2d.engine import Engine
    from s2d.model.loading import EMBEDDED
    from s2d.resolve import choose, load
    from s2d.sampling import SamplingParams

    if not 1 <= args.prompts <= 4 or args.max_new_tokens < 1:
        raise ValueError("--prompts must be 1-4 and --max-new-tokens >= 1")
    family = load(choose("s2d demo", None, None, "s2d", "cpu"), args.dtype, fast_tokenizer=True)
    tokenizer, targets, draft = family.tokenizer, family.models, family.draft
    rows = [json.loads(line) for line in (EMBEDDED / "prompts.jsonl").read_text().splitlines() if line.strip()]
    prompts = [tokenizer(r["text"]).input_ids for r in rows[:args.prompts]]
    greedy = SamplingParams()
    table, identical = [], True
    for name, target in targets.items():
        options = family.options(name)
        engines = {"ar": Engine(target, eos_token_ids=()),
                   "s2d": Engine(target, build_drafter("s2d", draft, options, target),
                                 engine_draft_tokens("s2d", options),
                                 eos_token_ids=())}
        for engine in engines.values():  # warm-up: the runtime's first build and caches
            engine.generate(prompts[0][:32], greedy, 8)
        speeds: dict[str, list[float]] = {m: [] for m in engines}
        outputs: dict[str, list[list[int]]] = {m: [] for m in engines}
        mats, exits = [], {}
        for prompt in tqdm(prompts, desc=f"demo {name}", unit="prompt", file=sys.stderr):
            for method, engine in engines.items():
                state = engine.generate(prompt, greedy, args.max_new_tokens)
                speeds[method].append(state.stats.tokens_per_s)
                outputs[method].append(state.output)
                if method == "s2d":
                    mats.append(state.stats.mean_accepted_tokens)
                    for e, c in state.stats.exit_counts.items():
                        exits[e] = exits.get(e, 0) + c
        same = outputs["ar"] == outputs["s2d"]
        identical &= same
        ar, s2d = statistics.fmean(speeds["ar"]), statistics.fmean(speeds["s2d"])
        used = ", ".join(f"{'lookup' if e == 0 else f'exit {e}'}: {c}" for e, c in sorted(exits.items()))
        table.append((name, "ar", f"{ar:.0f}", "1.00x", "1.00", "", ""))
        table.append((name, "s2d", f"{s2d:.0f}", f"{s2d / ar:.2f}x", f"{statistics.fmean(mats):.2f}", used,
                      "yes" if same else "NO"))
    header = ("target", "method", "tokens/s", "speedup", "MAT", "draft tokens from", "same output as ar")
    widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(len(header))]
    print(f"{len(prompts)} held-out prompts, {args.max_new_tokens} new tokens each, greedy, {args.dtype}:")
    for r in [header, *table]:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if not args.no_stream:
        name, target = next(iter(targets.items()))
        options = family.options(name)
        engine = Engine(target, build_drafter("s2d", draft, options, target), engine_draft_tokens("s2d", options))
        shown = rows[-1]["text"]  # the prompt the zoo continues most plausibly
        print(f"\n{name}, s2d, streamed (the prompt's last lines, then the completion):\n"
              + "\n".join(shown.splitlines()[-6:]), end="", flush=True)
        printed = ""
        states: list = []
        for _ in engine.stream(tokenizer(shown).input_ids, greedy, args.max_new_tokens, states):
            text = tokenizer.decode(states[0].output, skip_special_tokens=True).rstrip("\ufffd")
            if text.startswith(printed):
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
        print()
    if not identical:
        print("s2d demo: speculative output differed from plain decoding", file=sys.stderr)
        return 1
    return 0
