"""Rebuild the sorted draft for the zoo family (zoo-s, zoo-m, zoo-l): the package ships it, as built
here, in ``s2d/data/default/draft`` (the benchmark draft; stored once, not in ``benchmarks/``).

    python benchmarks/build_zoo_draft.py ../shared/zoo        # about 40 minutes on 2 CPU cores
    # -> runs/zoo-draft/draft (--out); to ship it: copy it into s2d/data/default/draft without
    #    build_info.json and the train_log_*.jsonl files
    python benchmarks/build_zoo_draft.py ../shared/zoo --soft-only   # stage 1 alone (for the MAT table)

The draft: the first 3 of zoo-s's 4 layers (with its embeddings, final norm and tied head), exits after
layers 1, 2 and 3. Three layers, not four: a 4-layer draft *is* zoo-s, one of the targets (no speedup
for it, and no room to improve), and its bf16 weights (20.5 MB) would not fit the 20 MB budget.

Stage 1, SoFT: mean next-token cross-entropy over the three exits on the zoo's training corpus (the
Python 3.11 standard library, site-packages excluded, files <= 400 kB) minus the held-out files of
``split.json``. Stage 2, SoFT + multi-target distillation: from stage 1, forward KL to each of the
three targets (averaged), plus a smaller CE term; half of the sequences end in 256 tokens the draft
sampled itself (on-policy, DistillSpec). Both stages are seeded; each has a time guard so the whole
build stays within 45 minutes even on a busy machine (a guard that fires ends that stage early, with
the draft exported and the event logged). Stage 3, the exit gates of ``s2d-gate`` (under a minute):
written beside the draft (``s2d_exit_gates.safetensors``). Stage 4, the tokens ranked by frequency
in the training text (``s2d_draft_vocab.json``, the ``draft_vocab`` option).

The held-out rule, the audit of each run's documents and stages 3-4 are the package's (``s2d.zoo``,
``s2d.train.beside``), which ``s2d zoo build`` also uses to build a whole family from scratch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
import time
from pathlib import Path

TARGETS = ("zoo-s", "zoo-m", "zoo-l")
EXITS = (1, 2, 3)
SHIPPED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def heldout_by_rule(stdlib: Path) -> set[str]:
    """The zoo's rule (``s2d.zoo.is_held_out``) applied to every ``*.py`` below ``stdlib``."""
    from s2d.zoo import is_held_out

    return {rel for rel in (p.relative_to(stdlib).as_posix() for p in stdlib.rglob("*.py")) if is_held_out(rel)}


def check_inputs(zoo: Path, stdlib: Path) -> set[str]:
    missing = [str(zoo / t / "config.json") for t in TARGETS if not (zoo / t / "config.json").is_file()]
    if not (zoo / "split.json").is_file():
        missing.append(str(zoo / "split.json"))
    if missing:
        sys.exit(f"build_zoo_draft: {zoo} is not the zoo directory (missing: {', '.join(missing)}); "
                 "pass the path to ../shared/zoo")
    if not (stdlib / "os.py").is_file():
        sys.exit(f"build_zoo_draft: {stdlib} is not a Python standard library directory (pass --stdlib)")
    if sys.version_info[:2] != (3, 11):
        print(f"build_zoo_draft: warning: the zoo trained on Python 3.11.7's standard library; this "
              f"is {sys.version.split()[0]}", file=sys.stderr)
    listed = set(json.loads((zoo / "split.json").read_text())["validation_files"])
    return listed | heldout_by_rule(stdlib)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo", type=Path, help="the zoo directory (../shared/zoo)")
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                    help="the Python 3.11 standard library (default: this interpreter's)")
    ap.add_argument("--work", type=Path, default=Path("runs/zoo-draft"), help="training runs (checkpoints, logs)")
    ap.add_argument("--out", type=Path, default=Path("runs/zoo-draft/draft"),
                    help="the built draft (default: runs/zoo-draft/draft, outside the source tree)")
    ap.add_argument("--soft-steps", type=int, default=160)
    ap.add_argument("--distill-steps", type=int, default=65)
    ap.add_argument("--soft-minutes", type=float, default=16, help="stage 1 time guard (training minutes)")
    ap.add_argument("--distill-minutes", type=float, default=25, help="stage 2 time guard (training minutes)")
    ap.add_argument("--soft-only", action="store_true",
                    help="run stage 1 only (the SoFT draft stays in --work/soft; --out is not written)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    zoo = args.zoo.resolve()
    heldout = check_inputs(zoo, args.stdlib)

    from s2d.train import DataConfig, DivergenceSpec, TrainConfig, train_draft
    from s2d.zoo import check_no_heldout

    data = DataConfig(paths=(args.stdlib,), glob="*.py", exclude_dirs=("site-packages",),
                      exclude_files=tuple(sorted(heldout)), max_file_bytes=400_000, seq_len=1024)
    from s2d.model.llama import CPU_BF16_UPCAST

    # bf16 autocast where the CPU multiplies bf16 natively (AMX, AVX512-BF16), float32 elsewhere:
    # without it autocast is far slower than float32 (one step > 6 min on an AVX2-only EPYC).
    common = dict(data=data, exits=EXITS, batch_size=16, micro_batch_size=2, seed=0, save_every=10,
                  progress=not args.no_progress, autocast=not CPU_BF16_UPCAST)
    soft = lambda: TrainConfig(out_dir=args.work / "soft", init=zoo / "zoo-s", num_layers=3, objective="soft",
                       steps=args.soft_steps, lr=4e-4, warmup_steps=10, max_minutes=args.soft_minutes, **common)
    distill = lambda: TrainConfig(out_dir=args.work / "distill", init=args.work / "soft", objective="distill",
                          targets=tuple(zoo / t for t in TARGETS), ce_weight=0.25, distill_weight=1.0,
                          divergence=DivergenceSpec("fkl"), on_policy=0.5, on_policy_temperature=0.7,
                          on_policy_tokens=256, steps=args.distill_steps, lr=2e-4, warmup_steps=5,
                          max_minutes=args.distill_minutes, **common)
    t0 = time.time()
    info = {}
    stages = (("soft", soft),) if args.soft_only else (("soft", soft), ("distill", distill))
    for name, make in stages:  # configs made in turn: stage 2 starts from stage 1
        cfg = make()
        result = train_draft(cfg)
        if result.status == "interrupted":
            sys.exit(f"build_zoo_draft: stage {name} was interrupted at step {result.step}; "
                     "run the same command again to resume")
        docs = check_no_heldout(cfg.out_dir, heldout)
        info[name] = {"status": result.status, "steps": result.step, "tokens": result.tokens,
                      "minutes": round(result.elapsed_s / 60, 1), "documents": docs, "final_loss": result.loss,
                      "config": cfg.to_json()}
        print(f"{name}: {result.status} after {result.step} steps, {result.tokens} tokens, "
              f"{result.elapsed_s / 60:.1f} min of training", file=sys.stderr)
    info["wall_minutes"] = round((time.time() - t0) / 60, 1)
    if args.soft_only:
        print(f"SoFT draft in {args.work / 'soft'}", file=sys.stderr)
        return 0
    info["heldout_files_excluded"] = len(heldout)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED:
        if (args.work / "distill" / name).exists():
            shutil.copy2(args.work / "distill" / name, args.out / name)
    for name in ("soft", "distill"):
        shutil.copy2(args.work / name / "train_log.jsonl", args.out / f"train_log_{name}.jsonl")
    # Stage 3: the exit gates of s2d-gate (logistic probes on the draft's activations, minutes), trained
    # on the same corpus (seq_len 512); stage 4: the vocabulary ranking. Both written beside the draft.
    from s2d.train.gates import add_gates_and_vocab

    info.update(add_gates_and_vocab(args.out, data, gate_positions=200_000, dtype="bfloat16",
                                    progress=not args.no_progress))
    (args.out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {args.out} ({info['wall_minutes']} min wall clock)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
