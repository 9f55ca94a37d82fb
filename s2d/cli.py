"""The ``s2d`` command line. Each subcommand lives beside the code it drives and registers here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from s2d.model.config import CheckpointError


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion with plain or speculative decoding")
    p.add_argument("--target", help="checkpoint directory or hub id (default: a tiny random model)")
    p.add_argument("--draft", help="draft checkpoint (for --method sd)")
    p.add_argument("--method", choices=["ar", "sd", "pld"], default=None,
                   help="ar = plain decoding, sd = draft model, pld = prompt lookup (default: sd with --draft, else ar)")
    p.add_argument("--num-draft-tokens", type=int, default=5)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file", type=Path)
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from s2d.drafting.lookup import PromptLookupDrafter
    from s2d.drafting.model import ModelDrafter
    from s2d.engine import Engine
    from s2d.loading import check_same_tokenizer, check_same_vocab, default_checkpoint, load_model, load_tokenizer
    from s2d.sampling import SamplingParams

    method = args.method or ("sd" if args.draft else "ar")
    if method == "sd" and not args.draft:
        raise SystemExit("s2d generate: --method sd needs --draft DIR")
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    prompt = args.prompt if args.prompt is not None else read_prompt_file(args.prompt_file)
    target_path = args.target
    if target_path is None:
        target_path = default_checkpoint()
        print(f"s2d: no --target given: using a tiny randomly initialised model at {target_path} "
              "(its output is gibberish; pass --target DIR for a real model)", file=sys.stderr)
    target = load_model(target_path, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(target_path)
    drafter = None
    if method == "sd":
        draft = load_model(args.draft, dtype=args.dtype, device=args.device)
        check_same_tokenizer(tokenizer, load_tokenizer(args.draft))
        check_same_vocab(target, draft)
        drafter = ModelDrafter(draft)
    elif method == "pld":
        drafter = PromptLookupDrafter()
    engine = Engine(target, drafter, args.num_draft_tokens)
    ids = tokenizer(prompt).input_ids
    states: list = []
    printed = ""
    for _ in engine.stream(ids, params, args.max_new_tokens, states):
        if not args.json:
            text = tokenizer.decode(states[0].output, skip_special_tokens=True)
            # Hold back a trailing replacement char: it may be half of a multi-byte character.
            stable = text.rstrip("\ufffd")
            if stable.startswith(printed):
                sys.stdout.write(stable[len(printed):])
                sys.stdout.flush()
                printed = stable
    state = states[0]
    text = tokenizer.decode(state.output, skip_special_tokens=True)
    stats = state.stats
    if args.json:
        print(json.dumps({
            "text": text, "tokens": state.output, "num_new_tokens": len(state.output),
            "tokens_per_s": stats.tokens_per_s, "elapsed_s": stats.elapsed_s,
            "target_passes": stats.target_passes, "mean_accepted_tokens": stats.mean_accepted_tokens,
            "draft_tokens_proposed": stats.proposed, "draft_tokens_accepted": stats.accepted,
            "method": method,
        }))
    else:
        sys.stdout.write(text[len(printed):] + "\n")
        print(f"[{len(state.output)} tokens, {stats.tokens_per_s:.1f} tokens/s, "
              f"{stats.mean_accepted_tokens:.2f} tokens per target pass]", file=sys.stderr)
    return 0


def read_prompt_file(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as err:
        raise SystemExit(f"s2d: cannot read --prompt-file {path}: {err.strerror}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2d", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate(sub)
    from s2d.bench.cli import add_bench

    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError) as err:
        print(f"s2d {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
