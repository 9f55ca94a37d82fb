"""Command-line argument helpers every sub-command shares: value parsers, the common flags, prompt files.

A leaf: it imports only the standard library (no torch, nothing else of s2d), so any command's module
can use it, and ``s2d.cli`` (the root command, which imports the sub-commands) is imported by none.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

DTYPES = ["bfloat16", "float32", "float16"]


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


def parse_floats(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated finite numbers."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def ints(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers (empty items skipped)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_targets(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` (named by its last path component) -> {name: path}."""
    targets: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or "/" in name:
            name, path = Path(spec.rstrip("/")).name or spec, spec
        if name in targets:
            raise ValueError(f"two targets are named {name!r}; name them with NAME=PATH")
        targets[name] = path
    return targets


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=finite_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=finite_float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=SEED, default=None)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
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


@dataclass(frozen=True)
class DraftFlags:
    """The drafting knobs given on the command line (``add_draft_args``); None: not given, so a stored
    calibration or the method's default applies."""

    num_draft_tokens: int | None = None
    schedule: str | None = None
    exit_thresholds: tuple[float, ...] | None = None
    stop_threshold: float | None = None
    tree_top_k: int | None = None
    tree_depth: int | None = None
    tree_nodes: int | None = None

    @classmethod
    def of(cls, args: argparse.Namespace) -> DraftFlags:
        return cls(args.num_draft_tokens, args.draft_schedule, args.exit_thresholds or None, args.stop_threshold,
                   args.tree_top_k, args.tree_depth, args.tree_nodes)


def read_prompt_file(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as err:
        raise SystemExit(f"s2d: cannot read --prompt-file {path}: {err.strerror}")
    except UnicodeDecodeError:
        raise ValueError(f"--prompt-file {path} is not UTF-8 text") from None


def read_prompts(path: Path, limit: int) -> list[str]:
    """Prompts of a JSONL file (Spec-Bench 'turns' or 'text'), or a plain text file as one prompt."""
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
