"""The ``s2d`` command line. Each subcommand lives beside the code it drives and registers here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from s2d.export_gguf import add_export_gguf
from s2d.model.config import CheckpointError
from s2d.train.cli import add_export_exit, add_train_draft


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def add_draft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", help="draft checkpoint: a plain small model, or a sorted multi-exit draft")
    p.add_argument("--method", default=None,
                   help="decoding method: ar, s2d, sd, sd-exit-E, s2d-softmax, s2d-gate, pld, lookup, lookup+M "
                        "(`s2d bench --help` describes each); default: s2d for a sorted draft, sd for another "
                        "draft, ar without one")
    p.add_argument("--num-draft-tokens", type=int, default=None, help="draft length (default 5, or calibrated)")
    p.add_argument("--draft-schedule", choices=["fixed", "heuristic"], default=None,
                   help="heuristic: +2 after a fully accepted draft, -1 otherwise (default fixed)")
    p.add_argument("--exit-thresholds", type=parse_floats, default=None,
                   help="s2d: comma-separated confidence per exit (default 0.5,...,0.5,0 or calibrated)")
    p.add_argument("--stop-threshold", type=float, default=None,
                   help="end a draft after a token whose confidence is below this (default 0 or calibrated)")


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion with plain or speculative decoding")
    p.add_argument("--target", action="append", default=None,
                   help="checkpoint directory or hub id, optionally NAME=PATH; repeat to hold several targets "
                        "(default: a tiny random model)")
    p.add_argument("--use", help="which target answers (a NAME of --target; default the first)")
    add_draft_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file", type=Path)
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=run_generate)


def draft_options(args: argparse.Namespace, method: str, draft_path: str | None, target_name: str):
    """Per-target drafting knobs: explicit flags win over a stored calibration, which wins over defaults."""
    from dataclasses import replace

    from s2d.calibrate import load_calibration, stored_options

    stored = stored_options(load_calibration(draft_path).get(target_name, {}) if draft_path and method == "s2d" else {})
    flags = {"num_draft_tokens": args.num_draft_tokens, "exit_thresholds": args.exit_thresholds or None,
             "stop_threshold": args.stop_threshold}
    return replace(stored, schedule=args.draft_schedule or "fixed", **{k: v for k, v in flags.items() if v is not None})


def default_method(method: str | None, draft) -> str:
    if method:
        return method
    if draft is None:
        return "ar"
    return "s2d" if draft.cfg.exits else "sd"


def run_generate(args: argparse.Namespace) -> int:
    from s2d.drafting import check_method, needs_draft_model
    from s2d.engine import MultiTargetEngine
    from s2d.loading import default_checkpoint, load_family, parse_targets
    from s2d.sampling import SamplingParams

    if args.method:
        check_method(args.method)
        if needs_draft_model(args.method) and not args.draft:
            raise SystemExit(f"s2d generate: --method {args.method} needs --draft DIR")
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    prompt = args.prompt if args.prompt is not None else read_prompt_file(args.prompt_file)
    if not args.target:
        path = default_checkpoint()
        print(f"s2d: no --target given: using a tiny randomly initialised model at {path} "
              "(its output is gibberish; pass --target DIR for a real model)", file=sys.stderr)
        args.target = [str(path)]
    targets = parse_targets(args.target)
    use = args.use or next(iter(targets))
    if use not in targets:
        raise ValueError(f"--use {use!r} names no target; targets: {', '.join(targets)}")
    draft_path = args.draft if (args.method is None or needs_draft_model(args.method)) else None
    tokenizer, models, draft = load_family(targets, draft_path, args.dtype, args.device)
    method = default_method(args.method, draft)
    options = {name: draft_options(args, method, draft_path, name) for name in targets}
    engine = MultiTargetEngine(models, draft, method, options)
    ids = tokenizer(prompt).input_ids
    states: list = []
    printed = ""
    for _ in engine.stream(use, ids, params, args.max_new_tokens, states):
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
            "exit_counts": {str(k): v for k, v in sorted(stats.exit_counts.items())},
            "method": method, "target": use,
        }))
    else:
        sys.stdout.write(text[len(printed):] + "\n")
        print(f"[{use}, {method}: {len(state.output)} tokens, {stats.tokens_per_s:.1f} tokens/s, "
              f"{stats.mean_accepted_tokens:.2f} tokens per target pass]", file=sys.stderr)
    return 0


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="pick per-target S2D thresholds and draft length by measured tokens/s")
    p.add_argument("--target", action="append", required=True, help="[NAME=]checkpoint; repeat for several")
    p.add_argument("--draft", required=True, help="the sorted draft; the result is stored beside it")
    p.add_argument("--prompts", type=Path, required=True,
                   help="JSONL (Spec-Bench 'turns' or 'text') or a plain text file (one prompt)")
    p.add_argument("--limit", type=int, default=4, help="prompts to use (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="calibration file (default DRAFT/s2d_calibration.json)")
    p.set_defaults(func=run_calibrate)


def read_prompts(path: Path, limit: int) -> list[str]:
    try:
        text = path.read_text()
    except OSError as err:
        raise SystemExit(f"s2d: cannot read {path}: {err.strerror}")
    if path.suffix != ".jsonl":
        return [text]
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts.append(row["turns"][0] if "turns" in row else row["text"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"{path}:{n}: expected a JSON object with 'turns' or 'text'")
    return prompts[:limit]


def run_calibrate(args: argparse.Namespace) -> int:
    from s2d.calibrate import calibrate, calibration_path, save_calibration
    from s2d.loading import load_family, parse_targets

    prompts = read_prompts(args.prompts, args.limit)
    tokenizer, models, draft = load_family(parse_targets(args.target), args.draft, args.dtype, args.device)
    out = args.out or calibration_path(args.draft)
    ids = [tokenizer(p).input_ids for p in prompts]
    for name, model in models.items():
        result = calibrate(model, draft, ids, args.max_new_tokens, desc=f"calibrate {name}")
        save_calibration(out, name, result)
        print(f"{name}: draft length {result['num_draft_tokens']}, exit thresholds {result['exit_thresholds']}, "
              f"stop {result['stop_threshold']} -> {result['tokens_per_s']:.1f} tokens/s")
    print(f"saved to {out}")
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
    add_train_draft(sub)
    add_export_exit(sub)
    add_export_gguf(sub)
    add_calibrate(sub)
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
