"""Train a sorted draft's exit gates (``s2d.drafting.gates``) on training text: minutes on the zoo.

The draft runs (no gradients) over packed rows of the training data; each position gives, per
non-last exit, the final-normed hidden state and whether that exit's argmax equals the deepest
exit's. A logistic probe per exit is fitted on those, and the gates are written beside the draft
(``s2d_exit_gates.safetensors``) with a small JSON report (``s2d_exit_gates.json``).

``s2d train-draft --objective gates --init DRAFT --out NEW`` (``train_gates_into``) writes the draft
with its gates to a new folder, as every writing command does: never into its input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from s2d.drafting.gates import GATES_FILE, ExitGates, fit_gates, gate_features
from s2d.model.config import CheckpointError
from s2d.model.loading import load_model, load_tokenizer
from s2d.train.beside import rank_vocab, write_draft_with
from s2d.train.data import DataConfig, load_packed

REPORT_FILE = "s2d_exit_gates.json"


@dataclass(frozen=True)
class GateTraining:
    draft: Path  # a sorted draft checkpoint (config "s2d_exits"); the gates are written beside it
    data: DataConfig
    positions: int = 100_000  # training positions (rows are taken in a seeded order until this many)
    batch_size: int = 8
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.positions < 1 or self.batch_size < 1:
            raise ValueError("positions and batch_size must be >= 1")


def train_gates(cfg: GateTraining, progress: bool = True) -> dict:
    """Fit and save the gates; returns the report (per exit: samples, agreement rate, train accuracy)."""
    draft = load_model(cfg.draft, dtype=cfg.dtype)
    if len(draft.cfg.exits) < 2:
        raise CheckpointError(f"{cfg.draft} is not a sorted draft with several exits (config 's2d_exits'); "
                              "exit gates decide between exits")
    from s2d.train.data import within_context

    tokenizer = load_tokenizer(cfg.draft)
    rows = load_packed(within_context(cfg.data, draft.cfg.max_positions), tokenizer).rows.long()
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    per_row = rows.shape[1]
    needed = min(rows.shape[0], -(-cfg.positions // per_row))
    feats: dict[int, list] = {}
    labels: dict[int, list] = {}
    with tqdm(total=needed * per_row, desc="exit gates: features", unit="pos", disable=not progress) as bar:
        for i in range(0, needed, cfg.batch_size):
            ids = rows[order[i:i + cfg.batch_size]]
            f, y = gate_features(draft, ids)
            for e in f:
                feats.setdefault(e, []).append(f[e])
                labels.setdefault(e, []).append(y[e])
            bar.update(ids.numel())
    features = {e: torch.cat(v) for e, v in feats.items()}
    targets = {e: torch.cat(v) for e, v in labels.items()}
    gates, report = fit_gates(features, targets)
    meta = {"exits": list(draft.cfg.exits), "positions": int(next(iter(targets.values())).numel()),
            "label": "exit argmax == deepest exit argmax", "per_exit": {str(e): r for e, r in report.items()}}
    gates.save(cfg.draft, meta)
    tmp = Path(cfg.draft) / (REPORT_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(Path(cfg.draft) / REPORT_FILE)
    return meta


def train_gates_into(draft: str | Path, out: str | Path, data: DataConfig, positions: int = 100_000,
                     batch_size: int = 8, seed: int = 0, progress: bool = True) -> dict:
    """Copy the sorted draft ``draft`` to ``out`` (new, empty, or an earlier output of this command) with
    trained exit gates; atomic: a failure leaves ``out`` as it was."""
    return write_draft_with(draft, out, data, "train-draft --objective gates", lambda tmp: train_gates(
        GateTraining(tmp, data, positions=positions, batch_size=batch_size, seed=seed), progress=progress))


def add_gates_and_vocab(draft: Path, data: DataConfig, gate_positions: int, dtype: str = "bfloat16",
                        progress: bool = True) -> dict:
    """In place, what a finished sorted draft gets beside it: its exit gates (s2d-gate; fitted on rows of at
    most 512 tokens of ``data``), then its tokens ranked by frequency in ``data`` (the draft_vocab option)."""
    gate_data = replace(data, seq_len=min(512, data.seq_len))
    gates = train_gates(GateTraining(Path(draft), gate_data, positions=gate_positions, batch_size=8, dtype=dtype),
                        progress=progress)
    return {"gates": gates["per_exit"], "vocab": rank_vocab(Path(draft), data)}


__all__ = ["GATES_FILE", "ExitGates", "GateTraining", "add_gates_and_vocab", "train_gates", "train_gates_into"]
