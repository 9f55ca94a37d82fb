"""Per-target calibration of the S2D drafter: exit thresholds, stop threshold and draft length,
chosen by measured tokens/s on a few prompts, and stored beside the draft."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, fields, replace
from pathlib import Path

from tqdm import tqdm

from s2d.drafting import DraftOptions, build_drafter, default_options, engine_draft_tokens, sorted_exits
from s2d.engine import Engine
from s2d.model.llama import Transformer
from s2d.sampling import SamplingParams

CALIBRATION_FILE = "s2d_calibration.json"
DRAFT_LENGTHS = (2, 3, 5, 7)
STOP_THRESHOLDS = (0.0, 0.1, 0.3)


def calibration_path(draft: str | Path) -> Path:
    from s2d.model.loading import resolve_checkpoint

    return resolve_checkpoint(draft) / CALIBRATION_FILE


def load_calibration(draft: str | Path, path: Path | None = None) -> dict[str, dict]:
    """{target key: {name, num_draft_tokens, exit_thresholds, stop_threshold, tokens_per_s}}; {} if none.

    Keys are the targets' fingerprints (``calibration_key``); files written before that are keyed by
    the target's name (``calibration_entry`` reads both).

    Every entry is checked here, so a hand-edited or damaged file is refused naming the file and
    the field, not met later as a crash deep in the drafter.
    """
    from s2d.side_files import read_json, side_file

    path = path or calibration_path(draft)
    if not path.exists():
        return {}
    with side_file(path, "calibration file", "delete it or rerun `s2d calibrate`"):
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        for name, entry in data.items():
            stored_options(entry, where=name)
        return data


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def stored_options(entry: dict, num_draft_tokens: int | None = None, where: str = "entry",
                   base: DraftOptions | None = None) -> DraftOptions:
    """One target's calibration entry as drafter options; what it lacks comes from ``base`` (default:
    ``s2d``'s default knobs), and ``num_draft_tokens`` when given."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where!r} must be a JSON object, got {entry!r}")
    base = base or default_options("s2d")
    k = entry.get("num_draft_tokens", num_draft_tokens or base.num_draft_tokens)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{where}.num_draft_tokens must be an integer >= 1, got {k!r}")
    thresholds = entry.get("exit_thresholds", list(base.exit_thresholds))
    if not isinstance(thresholds, list) or not all(_is_number(t) and 0 <= t <= 1 for t in thresholds):
        raise ValueError(f"{where}.exit_thresholds must be a list of numbers in [0, 1], got {thresholds!r}")
    stop = entry.get("stop_threshold", base.stop_threshold)
    if not (_is_number(stop) and 0 <= stop <= 1):
        raise ValueError(f"{where}.stop_threshold must be a number in [0, 1], got {stop!r}")
    # the other drafter options (lookup knobs, ...) pass through DraftOptions' own validation
    known = {f.name for f in fields(DraftOptions)} - {"num_draft_tokens", "exit_thresholds", "stop_threshold"}
    extra = {key: v for key, v in entry.items() if key in known}
    try:
        return replace(base, num_draft_tokens=k, exit_thresholds=tuple(thresholds), stop_threshold=stop, **extra)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def check_calibration_run(max_new_tokens: int) -> None:
    """Refuse runs too short to measure every draft length tried (a 1-token run never drafts)."""
    need = max(DRAFT_LENGTHS) + 1
    if max_new_tokens < need:
        raise ValueError(f"max_new_tokens {max_new_tokens} is too short to calibrate: a run must draft "
                         f"{max(DRAFT_LENGTHS)} tokens and verify them, so it needs at least {need}")


def calibration_key(target: Transformer) -> str:
    """What a target's calibration is stored under: its weights' fingerprint (the key of steering maps and
    refine tables), so the same model under another name finds it and another model under the name does not."""
    from s2d.drafting.steer import target_fingerprint

    return target_fingerprint(target)


def calibration_entry(data: dict[str, dict], target: Transformer | None, name: str) -> dict:
    """The stored entry for ``target`` (served as ``name``): by fingerprint; else one an older s2d stored by
    name (an entry without a "name" field), read as it was then; {} if none."""
    if target is not None and isinstance(entry := data.get(calibration_key(target)), dict):
        return entry
    legacy = data.get(name)
    if isinstance(legacy, dict) and "name" not in legacy:
        return legacy
    if target is None:  # no model to fingerprint: the entry calibrated under this name
        return next((e for e in data.values() if isinstance(e, dict) and e.get("name") == name), {})
    return {}


def save_calibration(path: Path, target_name: str, entry: dict, target: Transformer | None = None) -> None:
    """Merge one target's entry into the file, atomically (a crash never leaves half a file).

    With ``target``, the entry is keyed by its fingerprint (and replaces an older entry stored under
    ``target_name``); without, by the name, as older files were.
    """
    data = load_calibration("", path) if path.exists() else {}
    if target is None:
        data[target_name] = entry
    else:
        if isinstance(data.get(target_name), dict) and "name" not in data[target_name]:
            del data[target_name]  # superseded: this name's calibration is now the model's
        data[calibration_key(target)] = {"name": target_name, **entry}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibration-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def measure(target: Transformer, draft: Transformer, options: DraftOptions, prompts: list[list[int]],
            max_new_tokens: int) -> float:
    drafter = build_drafter("s2d", draft, options, target)
    engine = Engine(target, drafter, engine_draft_tokens("s2d", options), eos_token_ids=())
    tokens = seconds = 0.0
    proposed = 0
    for prompt in prompts:
        state = engine.generate(prompt, SamplingParams(), max_new_tokens)
        tokens += len(state.output)
        seconds += state.stats.elapsed_s
        proposed += state.stats.proposed
    if not proposed:  # nothing was drafted: the speed says nothing about these settings
        raise ValueError("calibration runs proposed no draft tokens (prompts too close to the context limit?); "
                         "use shorter prompts or a larger --max-new-tokens")
    return tokens / seconds


def calibrate(target: Transformer, draft: Transformer, prompts: list[list[int]], max_new_tokens: int = 64,
              desc: str = "calibrate") -> dict:
    """Coordinate search for ``s2d`` on this target: the exit that drafts where lookup has nothing,
    then the draft length, then the stop threshold; each stage keeps the fastest setting so far."""
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    check_calibration_run(max_new_tokens)
    measure(target, draft, default_options("s2d", draft), prompts[:1], 8)  # warm-up
    best = default_options("s2d", draft)
    best_speed = 0.0
    stages = [[(lambda e: lambda o: replace(o, exit=e))(e) for e in sorted_exits(draft)],
              [(lambda k: lambda o: replace(o, num_draft_tokens=k))(k) for k in DRAFT_LENGTHS],
              [(lambda s: lambda o: replace(o, stop_threshold=s))(s) for s in STOP_THRESHOLDS]]
    total = sum(len(s) for s in stages)
    tried: list[dict] = []
    with tqdm(total=total, desc=desc, unit="setting") as bar:
        for stage in stages:
            stage_best, stage_speed = best, -1.0
            for candidate in stage:
                options = candidate if isinstance(candidate, DraftOptions) else candidate(best)
                speed = measure(target, draft, options, prompts, max_new_tokens)
                tried.append({**asdict(options), "tokens_per_s": speed})
                if speed > stage_speed:
                    stage_best, stage_speed = options, speed
                bar.update()
                bar.set_postfix(best=f"{max(stage_speed, best_speed):.1f} tok/s")
            best, best_speed = stage_best, stage_speed
    return {"exit": best.exit, "num_draft_tokens": best.num_draft_tokens,
            "stop_threshold": best.stop_threshold, "tokens_per_s": best_speed, "tried": tried}
