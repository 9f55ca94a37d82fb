"""The ``s2d`` command line. Each subcommand lives beside the code it drives and registers here."""

# This module imports nothing heavy at the top (torch takes seconds to import): main() must be
# running, with its handlers, before a Ctrl-C during start-up can arrive.
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def finite_float(text: str) -> float:
    """argparse type: a finite number (NaN and inf slip through every range check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_in(low: int, high: int):
    """argparse type: an integer in [low, high) (the upper bound where a library would overflow)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value < high:
            shown = f"2**{high.bit_length() - 1}" if high > 10**6 else str(high)
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {shown}), got {text!r}")
        return value

    return parse


SEED = int_in(0, 2**63)  # torch's generators take 64 bits; bench adds per-question offsets


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=finite_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=finite_float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=SEED, default=None)
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def add_draft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", help="draft checkpoint: a plain small model, or a sorted multi-exit draft")
    p.add_argument("--method", default=None,
                   help="decoding method: ar, s2d, sd, sd-exit-E, s2d-softmax, s2d-gate, pld, lookup, lookup+M, "
                        "s2d-tree, rsd, rsd-sbs "
                        "(`s2d bench --help` describes each); default: s2d for a sorted draft, sd for another "
                        "draft, ar without one")
    p.add_argument("--num-draft-tokens", type=int, default=None, help="draft length (default 5, or calibrated)")
    p.add_argument("--draft-schedule", choices=["fixed", "heuristic"], default=None,
                   help="heuristic: +2 after a fully accepted draft, -1 otherwise (default fixed)")
    p.add_argument("--exit-thresholds", type=parse_floats, default=None,
                   help="s2d: comma-separated confidence per exit (default 0.5,...,0.5,0 or calibrated)")
    p.add_argument("--stop-threshold", type=finite_float, default=None,
                   help="end a draft after a token whose confidence is below this (default 0 or calibrated)")
    p.add_argument("--tree-top-k", type=int, default=None,
                   help="s2d-tree / rsd: children per expanded node; rsd-sbs: beams per level (default 2)")
    p.add_argument("--tree-depth", type=int, default=None, help="tree methods: levels below the root (default 6)")
    p.add_argument("--tree-nodes", type=int, default=None,
                   help="tree methods (s2d-tree, rsd, rsd-sbs): nodes verified per target pass, at most 63 "
                        "(default 12)")


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


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
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template as a user turn (chat / instruct models)")
    p.add_argument("--system", help="a system message for --chat (implies --chat)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens (speed runs)")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=run_generate)


def prompt_ids(tokenizer, prompt: str, chat: bool, system: str | None, source: str) -> list[int]:
    """The prompt's token ids; with ``chat``, rendered by the tokenizer's chat template first."""
    if not chat:
        return tokenizer(prompt).input_ids
    from s2d.model.config import CheckpointError

    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(f"--chat: the tokenizer of {source} has no chat template (not a chat model?); "
                              "drop --chat and --system")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # the template is the checkpoint's own Jinja code: it may raise anything
        raise CheckpointError(f"--chat: the chat template of {source} failed: {err}") from None
    # The template writes the special tokens (BOS, role markers) itself.
    return tokenizer(text, add_special_tokens=False).input_ids


def empty_answer_hint(tokenizer, chat: bool) -> str:
    """Why a generation ended at once (its first token was end-of-sequence), and what to try."""
    hint = "s2d generate: the model ended its answer at once (its first token is an end-of-sequence token)"
    if getattr(tokenizer, "chat_template", None) and not chat:
        return hint + "; it is a chat model: try --chat (and --system TEXT)"
    return hint + "; --ignore-eos generates past it"


def draft_options(args: argparse.Namespace, method: str, draft_path: str | None, target_name: str, draft=None,
                  target=None):
    """Per-target drafting knobs: explicit flags win over a stored calibration (``target``'s, else the one
    stored under ``target_name``), which wins over defaults."""
    from dataclasses import replace

    from s2d.calibrate import calibration_entry, load_calibration, stored_options

    from s2d.drafting import default_options

    use = draft_path and method == "s2d"
    entry = calibration_entry(load_calibration(draft_path), target, target_name) if use else {}
    stored = stored_options(entry, base=default_options(method, draft))
    flags = {"num_draft_tokens": args.num_draft_tokens, "exit_thresholds": args.exit_thresholds or None,
             "stop_threshold": args.stop_threshold, "tree_top_k": args.tree_top_k, "tree_depth": args.tree_depth,
             "tree_nodes": args.tree_nodes}
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
    from s2d.loading import embedded_family, load_family, parse_targets
    from s2d.model.loading import check_device
    from s2d.sampling import SamplingParams

    if not args.target:
        family, embedded_draft = embedded_family()
        args.target = [f"{name}={path}" for name, path in family.items()]
        if args.draft is None:
            args.draft = str(embedded_draft)
        print(f"s2d: no --target: the embedded default, zoo-l (a 52M-parameter Python model) with its sorted "
              f"draft, method {args.method or 's2d'} (pass --target DIR for your own model)", file=sys.stderr)
    if args.method:
        check_method(args.method)
        if needs_draft_model(args.method) and not args.draft:
            raise SystemExit(f"s2d generate: --method {args.method} needs --draft DIR")
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    check_device(args.device, "--device")
    chat = args.chat or args.system is not None
    prompt = args.prompt if args.prompt is not None else read_prompt_file(args.prompt_file)
    targets = parse_targets(args.target)
    use = args.use or next(iter(targets))
    if use not in targets:
        raise ValueError(f"--use {use!r} names no target; targets: {', '.join(targets)}")
    draft_path = args.draft if (args.method is None or needs_draft_model(args.method)) else None
    # Chat templates need transformers' tokenizer; plain text is encoded without importing transformers.
    tokenizer, models, draft = load_family(targets, draft_path, args.dtype, args.device,
                                           fast_tokenizer=not chat)
    method = default_method(args.method, draft)
    if method == "s2d" and draft is not None and len(draft.cfg.exits) < 2:
        print("s2d: the draft has no exits (config 's2d_exits'): --method s2d runs as lookup + the whole draft "
              "(vanilla speculative decoding); a sorted draft comes from `s2d train-draft`", file=sys.stderr)
    options = {name: draft_options(args, method, draft_path, name, draft, models[name]) for name in targets}
    engine = MultiTargetEngine(models, draft, method, options, eos_token_ids=() if args.ignore_eos else None)
    ids = prompt_ids(tokenizer, prompt, chat, args.system, targets[use])
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
            "method": method, "target": use, "prompt_tokens": len(ids),
        }))
    else:
        sys.stdout.write(text[len(printed):] + "\n")
        print(f"[{use}, {method}: {len(state.output)} tokens, {stats.tokens_per_s:.1f} tokens/s, "
              f"{stats.mean_accepted_tokens:.2f} tokens per target pass]", file=sys.stderr)
    if len(state.output) == 1 and state.output[0] in engine.engine(use).eos:
        print(empty_answer_hint(tokenizer, chat), file=sys.stderr)
    return 0


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="pick per-target S2D thresholds and draft length by measured tokens/s")
    p.add_argument("--target", action="append", required=True, help="[NAME=]checkpoint; repeat for several")
    p.add_argument("--draft", required=True, help="the sorted draft; the result is stored beside it")
    p.add_argument("--prompts", type=Path, required=True,
                   help="JSONL (Spec-Bench 'turns' or 'text') or a plain text file (one prompt)")
    p.add_argument("--limit", type=int_in(1, 2**31), default=4, help="prompts to use (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens per run (default 64; at least one more than the longest draft tried)")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="calibration file (default DRAFT/s2d_calibration.json)")
    p.set_defaults(func=run_calibrate)


def read_prompts(path: Path, limit: int) -> list[str]:
    try:
        text = path.read_text()
    except OSError as err:
        raise SystemExit(f"s2d: cannot read {path}: {err.strerror}")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
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
    from s2d.calibrate import calibrate, calibration_path, check_calibration_run, load_calibration, save_calibration
    from s2d.loading import load_family, parse_targets
    from s2d.model.loading import check_device

    # Everything that can be refused is refused before minutes of measuring.
    check_calibration_run(args.max_new_tokens)
    check_device(args.device, "--device")
    prompts = read_prompts(args.prompts, args.limit)
    out = args.out or calibration_path(args.draft)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the calibration file's path")
    load_calibration(args.draft, out)  # an existing file must be a calibration (it is merged into, not replaced)
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist")
    tokenizer, models, draft = load_family(parse_targets(args.target), args.draft, args.dtype, args.device)
    ids = [tokenizer(p).input_ids for p in prompts]
    for name, model in models.items():
        result = calibrate(model, draft, ids, args.max_new_tokens, desc=f"calibrate {name}")
        save_calibration(out, name, result, model)
        print(f"{name}: exit {result['exit']}, draft length {result['num_draft_tokens']}, "
              f"stop {result['stop_threshold']} -> {result['tokens_per_s']:.1f} tokens/s")
    print(f"saved to {out}")
    return 0


def read_prompt_file(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as err:
        raise SystemExit(f"s2d: cannot read --prompt-file {path}: {err.strerror}")
    except UnicodeDecodeError:
        raise ValueError(f"--prompt-file {path} is not UTF-8 text") from None


def build_parser() -> argparse.ArgumentParser:
    from s2d.demo import add_demo
    from s2d.export_gguf import add_export_gguf
    from s2d.serve.cli import add_serve
    from s2d.train.cli import add_export_exit, add_train_draft
    from s2d.zoo import add_zoo

    parser = argparse.ArgumentParser(prog="s2d", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate(sub)
    add_demo(sub)
    add_train_draft(sub)
    add_export_exit(sub)
    add_export_gguf(sub)
    add_calibrate(sub)
    from s2d.train.refine import add_calibrate_refine

    add_calibrate_refine(sub)
    add_serve(sub)
    add_zoo(sub)
    from s2d.bench.cli import add_bench

    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    command = "s2d"
    try:
        args = build_parser().parse_args(argv)
        command = f"s2d {args.command}"
        return args.func(args)
    except ValueError as err:  # CheckpointError, InputError, BenchError: the user's input, said in one line
        print(f"{command}: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    except OSError as err:  # a folder that cannot be written, a full disk: the system's own words suffice
        print(f"{command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before or after the work (train-draft handles it during training)
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
