"""``results.json`` (the summaries, schema in docs/bench.md) and ``records.jsonl`` (every output)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from s2d.bench.errors import BenchError
from s2d.bench.metrics import RunSummary
from s2d.bench.records import QuestionRecord
from s2d.bench.runner import BenchConfig, BenchOutcome

SCHEMA = "s2d.bench.results/1"

# Field -> allowed JSON types of each object in "runs"; the documented contract (docs/bench.md).
RUN_FIELDS: dict[str, tuple[type, ...]] = {
    "target": (str,), "method": (str,), "category": (str,), "num_questions": (int,), "num_turns": (int,),
    "new_tokens": (int,), "elapsed_s": (float, int), "tokens_per_s": (float, int),
    "speedup": (float, int, type(None)), "speedup_vs_hf_ar": (float, int, type(None)),
    "mean_accepted_tokens": (float, int, type(None)), "draft_acceptance_rate": (float, int, type(None)),
    "acceptance_by_position": (list,), "exit_histogram": (dict,), "greedy_identical": (float, int, type(None)),
    "truncated_turns": (int,),
}
TOP_FIELDS: dict[str, type] = {"schema": str, "created": str, "config": dict, "environment": dict, "targets": dict,
                               "skipped": list, "runs": list}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_version() -> str | None:
    """The s2d git commit the run used, "+dirty" when the working tree differed; None outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "s2d"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    import torch
    import transformers

    from s2d.model import native

    # The native runtime's instruction set decides CPU speeds more than the processor's name does
    # (S2D_NATIVE_ISA can cap it), so a result says which code ran.
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": cpu_name(), "native_isa": native.isa_kind(),
            "native_products": native.product_kind(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "s2d_commit": source_version()}


def results_document(cfg: BenchConfig, outcome: BenchOutcome, runs: list[RunSummary]) -> dict[str, Any]:
    config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))  # Paths -> str
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config,
            "environment": environment(), "targets": outcome.target_names,
            "skipped": [asdict(s) for s in outcome.skipped], "runs": [asdict(r) for r in runs]}


def validate_results(doc: Any) -> None:
    """Raise BenchError naming the first field that breaks the documented schema."""
    if not isinstance(doc, dict):
        raise BenchError("results.json must hold a JSON object")
    for key, kind in TOP_FIELDS.items():
        if not isinstance(doc.get(key), kind):
            raise BenchError(f"results.json: '{key}' missing or not a {kind.__name__}")
    if doc["schema"] != SCHEMA:
        raise BenchError(f"results.json: schema {doc['schema']!r}, this s2d reads {SCHEMA!r}")
    for i, run in enumerate(doc["runs"]):
        for key, kinds in RUN_FIELDS.items():
            if key not in run:
                raise BenchError(f"results.json: runs[{i}] lacks '{key}'")
            value = run[key]
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise BenchError(f"results.json: runs[{i}].{key} = {value!r} has the wrong type")


def write_results(out: Path, doc: dict[str, Any], records: list[QuestionRecord]) -> None:
    """records.jsonl first (the raw outputs survive even a summary that fails validation), then
    results.json; each written to a temporary name and renamed, so neither is ever half a file."""
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "records.jsonl", "".join(json.dumps(r.to_json()) + "\n" for r in records))
    validate_results(doc)
    _write_atomic(out / "results.json", json.dumps(doc, indent=1) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_results(out: Path) -> dict[str, Any]:
    path = out / "results.json" if out.is_dir() else out
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise BenchError(f"no results.json at {path}") from err
    except json.JSONDecodeError as err:
        raise BenchError(f"{path} is not valid JSON: {err}") from err
    validate_results(doc)
    return doc


def summaries_from(doc: dict[str, Any]) -> list[RunSummary]:
    names = [f.name for f in dataclasses.fields(RunSummary)]
    return [RunSummary(**{k: run[k] for k in names if k in run}) for run in doc["runs"]]
