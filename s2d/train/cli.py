"""``s2d train-draft`` and ``s2d export-exit``: argparse front-ends of the Python API, kept beside it."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from s2d.args import finite_float, int_in, ints
from s2d.train.losses import DIVERGENCES


def _paths(text: str) -> tuple[Path, ...]:
    return tuple(Path(x) for x in text.split(",") if x.strip())


def add_train_draft(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-draft", help="train a sorted multi-exit draft (SoFT, multi-target distillation)",
                       description="Train one sorted draft with several exits for a family of targets. "
                                   "Re-running the same command in the same --out resumes from its last checkpoint.")
    p.add_argument("--out", type=Path, required=True, help="output directory (draft, log, checkpoints)")
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="text files, JSONL files ('text' or Spec-Bench 'turns'), or directories of source files")
    p.add_argument("--exits", type=ints, help="layer counts with an exit, e.g. 1,2,3 (soft and distill)")
    p.add_argument("--num-layers", type=int, help="K, the draft's depth (default: the deepest exit)")
    init = p.add_mutually_exclusive_group(required=True)
    init.add_argument("--init", type=Path, help="checkpoint whose first K layers (+ embeddings, norm, head) seed the draft")
    init.add_argument("--random-init", action="store_true", help="random initialisation (give the shape below)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=None, help="default: --num-heads")
    p.add_argument("--intermediate-size", type=int, default=None, help="default: 8/3 * hidden, rounded up to 64")
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--tokenizer", type=Path, help="default: the --init checkpoint's, else the first target's")
    p.add_argument("--targets", type=_paths, default=(), help="comma-separated teacher checkpoints")
    p.add_argument("--objective", choices=["soft", "distill", "gates", "vocab", "steer", "ngram"], default="soft",
                   help="soft: SoFT; distill: toward --targets; gates: train the exit gates of the sorted draft "
                        "--init (the s2d-gate method) on --data; vocab: rank its tokens by frequency in --data "
                        "(the draft_vocab option); steer: train the steering maps of the draft --init for --targets (the "
                        "s2d-steer method; --exits: the exits to steer, default the s2d exit); ngram: count the n-grams "
                        "of --data for the refined methods (s2d-refine), with --targets and --calibration also "
                        "calibrate their weights; gates, vocab, steer and ngram write the draft with the result "
                        "to --out")
    p.add_argument("--ngram-min-count", type=int, default=2, help="ngram: drop n-grams seen fewer times (default 2)")
    p.add_argument("--calibration", type=Path, nargs="+", default=(),
                   help="ngram with --targets: prompts (JSONL) the refine weights are calibrated on")
    p.add_argument("--gate-positions", type=int, default=100_000, help="gates: training positions (default 100k)")
    p.add_argument("--ce-weight", type=finite_float, help="default 1 for soft, 0 for distill")
    p.add_argument("--distill-weight", type=finite_float, help="default 1 for distill")
    p.add_argument("--divergence", choices=DIVERGENCES, default="fkl")
    p.add_argument("--jsd-beta", type=finite_float, default=0.5)
    p.add_argument("--on-policy", type=finite_float, default=0.0, help="lambda: fraction of draft-generated sequences")
    p.add_argument("--on-policy-temperature", type=finite_float, default=1.0)
    p.add_argument("--on-policy-tokens", type=int, help="tokens sampled per on-policy sequence (default seq_len/2)")
    p.add_argument("--glob", default="*.py", help="which files of a --data directory to read")
    p.add_argument("--exclude-dir", action="append", default=[], help="directory name to skip (repeatable)")
    p.add_argument("--exclude-from", type=Path, action="append", default=[],
                   help="held-out files never to train on: a split.json ('validation_files') or one path per line")
    p.add_argument("--max-file-bytes", type=int)
    p.add_argument("--seq-len", type=int, help="default 512 (steer: 256)")
    p.add_argument("--steps", type=int, help="default 1000 (steer: 150)")
    p.add_argument("--batch-size", type=int, help="sequences per step, over all processes (default 16; steer: 8)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lr", type=finite_float, help="default 3e-4 (steer: 3e-3)")
    p.add_argument("--min-lr-ratio", type=finite_float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--weight-decay", type=finite_float, default=0.0)
    p.add_argument("--grad-clip", type=finite_float, default=1.0)
    p.add_argument("--no-autocast", action="store_true", help="float32 forward (default: bfloat16 autocast)")
    p.add_argument("--teacher-dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument("--save-dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument("--seed", type=int_in(0, 2**32), default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--max-minutes", type=finite_float)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train_draft)


def data_from_args(args: argparse.Namespace):
    from s2d.train.data import DataConfig, exclusion_list

    excluded: tuple[str, ...] = ()
    for path in args.exclude_from:
        excluded += exclusion_list(path)
    return DataConfig(paths=tuple(args.data), glob=args.glob, exclude_dirs=tuple(args.exclude_dir),
                      exclude_files=excluded, max_file_bytes=args.max_file_bytes, seq_len=args.seq_len)


def config_from_args(args: argparse.Namespace):
    from s2d.train.config import DraftShape, TrainConfig
    from s2d.train.losses import DivergenceSpec

    if not args.exits:
        raise ValueError(f"--objective {args.objective} needs --exits (layer counts with an exit, e.g. 1,2,3)")
    data = data_from_args(args)
    shape = None
    if args.random_init:
        ffn = args.intermediate_size or -(-8 * args.hidden_size // 3 // 64) * 64
        shape = DraftShape(args.hidden_size, args.num_heads, args.num_kv_heads or args.num_heads, ffn, args.max_positions)
    return TrainConfig(
        out_dir=args.out, data=data, exits=args.exits, num_layers=args.num_layers, init=args.init, shape=shape,
        tokenizer=args.tokenizer, targets=args.targets, objective=args.objective, ce_weight=args.ce_weight,
        distill_weight=args.distill_weight, divergence=DivergenceSpec(args.divergence, args.jsd_beta),
        on_policy=args.on_policy, on_policy_temperature=args.on_policy_temperature,
        on_policy_tokens=args.on_policy_tokens, teacher_dtype=args.teacher_dtype, steps=args.steps,
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        autocast=not args.no_autocast, seed=args.seed, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, max_minutes=args.max_minutes,
        save_dtype=args.save_dtype, device=args.device, progress=not args.no_progress)


# Defaults that depend on the objective (None in the parser): a map is small and learns fast.
OBJECTIVE_DEFAULTS = {"steer": {"steps": 150, "lr": 3e-3, "batch_size": 8, "seq_len": 256}}
TRAINING_DEFAULTS = {"steps": 1000, "lr": 3e-4, "batch_size": 16, "seq_len": 512}


def fill_defaults(args: argparse.Namespace) -> None:
    for name, value in {**TRAINING_DEFAULTS, **OBJECTIVE_DEFAULTS.get(args.objective, {})}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def run_train_draft(args: argparse.Namespace) -> int:
    fill_defaults(args)
    if args.objective == "steer":
        return run_steer(args)
    if args.objective == "ngram":
        return run_ngram(args)
    if args.objective in ("gates", "vocab"):
        return run_beside(args)
    from s2d.train.trainer import train_draft

    result = train_draft(config_from_args(args))
    loss = result.loss if math.isfinite(result.loss) else None  # NaN is not JSON; a run that ran no step has none
    print(json.dumps({"out_dir": str(result.out_dir), "status": result.status, "step": result.step,
                      "tokens": result.tokens, "elapsed_s": round(result.elapsed_s, 1), "loss": loss},
                     allow_nan=False))
    if result.status == "interrupted":
        print(f"s2d train-draft: stopped at step {result.step}; run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


def run_beside(args: argparse.Namespace) -> int:
    """--objective gates|vocab: the --init draft, copied to --out with what it computes beside it."""
    from s2d.train.beside import rank_draft_vocab
    from s2d.train.gates import train_gates_into

    if args.init is None:
        raise ValueError(f"--objective {args.objective} needs --init: the draft to work on")
    if args.objective == "gates":
        report = train_gates_into(args.init, args.out, data_from_args(args), positions=args.gate_positions,
                                  batch_size=args.micro_batch_size, seed=args.seed,
                                  progress=not args.no_progress)["per_exit"]
    else:
        report = rank_draft_vocab(args.init, args.out, data_from_args(args))
    print(json.dumps({"out_dir": str(args.out), "status": "completed", args.objective: report}))
    return 0


def run_steer(args: argparse.Namespace) -> int:
    """--objective steer: the --init draft, copied to --out with its steering maps beside it."""
    from s2d.train.steer import SteerTraining, train_steering_into

    if args.init is None:
        raise ValueError("--objective steer needs --init: the draft to steer")
    cfg = SteerTraining(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed)
    report = train_steering_into(args.init, args.out, args.targets, data_from_args(args), args.exits, cfg,
                                 target_dtype=args.teacher_dtype, progress=not args.no_progress)
    print(json.dumps({"out_dir": str(args.out), "status": "completed", "steer": report}))
    return 0


def run_ngram(args: argparse.Namespace) -> int:
    """--objective ngram: the --init draft, copied to --out with its corpus n-gram model (and refine weights)."""
    from s2d.train.refine import ngram_draft, read_calibration_prompts

    if args.init is None:
        raise ValueError("--objective ngram needs --init: the draft whose tokenizer counts the n-grams")
    targets = {Path(str(t).rstrip("/")).name: str(t) for t in args.targets}
    prompts = read_calibration_prompts(list(args.calibration)) if args.calibration else None
    report = ngram_draft(args.init, args.out, data_from_args(args), args.ngram_min_count, targets, prompts,
                         args.teacher_dtype, progress=not args.no_progress)
    print(json.dumps({"out_dir": str(args.out), "status": "completed", **report}))
    return 0


def add_export_exit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-exit", help="write one exit of a sorted draft as a plain checkpoint")
    p.add_argument("--draft", type=Path, required=True)
    p.add_argument("--exit", type=int, required=True, help="the exit (layer count) to keep")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=run_export_exit)


def run_export_exit(args: argparse.Namespace) -> int:
    from s2d.train.export import export_exit

    out = export_exit(args.draft, args.exit, args.out)
    print(f"wrote exit {args.exit} of {args.draft} to {out}", file=sys.stderr)
    return 0
