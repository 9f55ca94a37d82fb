"""The ``s2d`` command line. Each subcommand lives beside the code it drives and registers here."""

# This module imports nothing heavy at the top (torch takes seconds to import): main() must be
# running, with its handlers, before a Ctrl-C during start-up can arrive.
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from s2d.args import DTYPES, DraftFlags, add_draft_args, add_sampling_args, int_in, read_prompt_file, read_prompts


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion with plain or speculative decoding")
    p.add_argument("--target", action="append", default=None,
                   help="checkpoint directory or hub id, optionally NAME=PATH; repeat to hold several targets "
                        "(default: the embedded zoo-l and its sorted draft)")
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


def run_generate(args: argparse.Namespace) -> int:
    from s2d.engine import MultiTargetEngine
    from s2d.resolve import choose, load
    from s2d.sampling import SamplingParams

    choice = choose("s2d generate", args.target, args.draft, args.method, args.device)
    if choice.embedded:
        print(f"s2d: no --target: the embedded default, zoo-l (a 52M-parameter Python model) with its sorted "
              f"draft, method {args.method or 's2d'} (pass --target DIR for your own model)", file=sys.stderr)
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    chat = args.chat or args.system is not None
    prompt = args.prompt if args.prompt is not None else read_prompt_file(args.prompt_file)
    targets = choice.targets
    use = args.use or next(iter(targets))
    if use not in targets:
        raise ValueError(f"--use {use!r} names no target; targets: {', '.join(targets)}")
    # Chat templates need transformers' tokenizer; plain text is encoded without importing transformers.
    family = load(choice, args.dtype, fast_tokenizer=not chat)
    tokenizer, draft, method = family.tokenizer, family.draft, family.method
    if method == "s2d" and draft is not None and len(draft.cfg.exits) < 2:
        print("s2d: the draft has no exits (config 's2d_exits'): --method s2d runs as lookup + the whole draft "
              "(vanilla speculative decoding); a sorted draft comes from `s2d train-draft`", file=sys.stderr)
    flags = DraftFlags.of(args)
    options = {name: family.options(name, flags=flags) for name in targets}
    engine = MultiTargetEngine(family.models, draft, method, options, eos_token_ids=() if args.ignore_eos else None)
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
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="calibration file (default DRAFT/s2d_calibration.json)")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from s2d.calibrate import calibrate, calibration_path, check_calibration_run, load_calibration, save_calibration
    from s2d.resolve import choose, load

    # Everything that can be refused is refused before minutes of measuring.
    check_calibration_run(args.max_new_tokens)
    choice = choose("s2d calibrate", args.target, args.draft, None, args.device)
    prompts = read_prompts(args.prompts, args.limit)
    out = args.out or calibration_path(args.draft)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the calibration file's path")
    load_calibration(args.draft, out)  # an existing file must be a calibration (it is merged into, not replaced)
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist")
    family = load(choice, args.dtype)
    ids = [family.tokenizer(p).input_ids for p in prompts]
    for name, model in family.models.items():
        result = calibrate(model, family.draft, ids, args.max_new_tokens, desc=f"calibrate {name}")
        save_calibration(out, name, result, model)
        print(f"{name}: exit {result['exit']}, draft length {result['num_draft_tokens']}, "
              f"stop {result['stop_threshold']} -> {result['tokens_per_s']:.1f} tokens/s")
    print(f"saved to {out}")
    return 0


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
