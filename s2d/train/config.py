"""Typed, validated configuration of a draft training run (SoFT and/or multi-target distillation)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from s2d.model.loading import check_device
from s2d.train.data import DataConfig
from s2d.train.losses import DivergenceSpec

Objective = Literal["soft", "distill"]
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DraftShape:
    """The shape of a randomly initialised draft (Llama architecture, tokenizer's vocabulary)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int = 2048
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for f in ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "max_positions"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size {self.hidden_size}, num_heads {self.num_heads} and num_kv_heads "
                             f"{self.num_kv_heads} must divide one another")


@dataclass(frozen=True)
class TrainConfig:
    out_dir: Path
    data: DataConfig
    exits: tuple[int, ...]  # layer counts after which an exit reads out, ascending (e.g. (1, 2, 3))
    num_layers: int | None = None  # K, the draft's depth; default: the deepest exit
    init: Path | None = None  # checkpoint whose embeddings, first K layers, final norm and head seed the draft
    shape: DraftShape | None = None  # ... or a random initialisation of this shape
    tokenizer: Path | None = None  # default: the init checkpoint's, else the first target's
    targets: tuple[Path, ...] = ()  # teachers for distillation; all must share the tokenizer
    objective: Objective = "soft"
    ce_weight: float | None = None  # weight of SoFT's cross-entropy; default 1 for soft, 0 for distill
    distill_weight: float | None = None  # weight of the divergence; default 0 for soft, 1 for distill
    divergence: DivergenceSpec = field(default_factory=DivergenceSpec)
    on_policy: float = 0.0  # lambda: fraction of sequences whose continuation the draft samples itself
    on_policy_temperature: float = 1.0
    on_policy_tokens: int | None = None  # tokens sampled per on-policy sequence; default seq_len // 2
    teacher_dtype: str = "bfloat16"
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per optimizer step, over all processes
    micro_batch_size: int = 4  # sequences per forward pass in one process (gradient accumulation)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    autocast: bool = True  # bfloat16 autocast for the draft's forward (fp32 master weights)
    seed: int = 0
    save_every: int = 100  # steps between checkpoints
    keep_checkpoints: int = 2
    log_every: int = 1
    max_minutes: float | None = None  # stop (checkpoint + export) after this much training time
    save_dtype: str = "bfloat16"  # dtype of the exported draft (checkpoints keep float32)
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        # A NaN or inf slips through every range check below (all comparisons with NaN are False).
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            # Per-step generators are seeded with seed * 1_000_003 + ..., which must stay below 2**63.
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        check_device(self.device)
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "targets", tuple(Path(t) for t in self.targets))
        for name in ("init", "tokenizer"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        exits = tuple(int(e) for e in self.exits)
        object.__setattr__(self, "exits", exits)
        if not exits:
            raise ValueError("give at least one exit (a layer count, e.g. 1,2,3)")
        if list(exits) != sorted(set(exits)) or exits[0] < 1:
            raise ValueError(f"exits must be distinct positive layer counts in ascending order, got {list(exits)}")
        if self.num_layers is not None and exits[-1] > self.num_layers:
            raise ValueError(f"exit {exits[-1]} is beyond the draft's {self.num_layers} layers")
        if (self.init is None) == (self.shape is None):
            raise ValueError("give exactly one of init (a checkpoint) and shape (a random initialisation)")
        if self.init is not None and not (self.init / "config.json").is_file():
            raise ValueError(f"init checkpoint {self.init} has no config.json")
        for t in self.targets:
            if not (t / "config.json").is_file():
                raise ValueError(f"target {t} has no config.json")
        if self.init is None and self.tokenizer is None and not self.targets:
            raise ValueError("a randomly initialised draft needs a tokenizer (or a target to take it from)")
        if self.objective not in ("soft", "distill"):
            raise ValueError(f"objective must be 'soft' or 'distill', got {self.objective!r}")
        ce = self.ce_weight if self.ce_weight is not None else (1.0 if self.objective == "soft" else 0.0)
        kd = self.distill_weight if self.distill_weight is not None else (0.0 if self.objective == "soft" else 1.0)
        object.__setattr__(self, "ce_weight", float(ce))
        object.__setattr__(self, "distill_weight", float(kd))
        if ce < 0 or kd < 0 or ce + kd == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0 (ce {ce}, distill {kd})")
        if self.objective == "soft" and kd > 0:
            raise ValueError("objective 'soft' has no distillation term; use objective 'distill' with a ce weight")
        if kd > 0 and not self.targets:
            raise ValueError("distillation needs at least one target")
        if not 0 <= self.on_policy <= 1:
            raise ValueError(f"on_policy (lambda) must be in [0, 1], got {self.on_policy}")
        if self.on_policy > 0 and kd == 0:
            raise ValueError("on-policy sequences only make sense with distillation (CE on the draft's own "
                             "samples teaches it nothing)")
        if self.on_policy_temperature <= 0:
            raise ValueError(f"on_policy_temperature must be > 0, got {self.on_policy_temperature}")
        n_new = self.on_policy_tokens if self.on_policy_tokens is not None else self.data.seq_len // 2
        if not 1 <= n_new < self.data.seq_len:
            raise ValueError(f"on_policy_tokens must be in [1, seq_len), got {n_new}")
        object.__setattr__(self, "on_policy_tokens", n_new)
        for name in ("teacher_dtype", "save_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "micro_batch_size", "save_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("lr must be > 0, min_lr_ratio in [0, 1], warmup_steps and grad_clip >= 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")

    @property
    def depth(self) -> int:
        """K: the number of layers the draft keeps."""
        return self.num_layers if self.num_layers is not None else self.exits[-1]

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    # Fields a resumed run may change: bookkeeping, and ``steps`` to extend a run (its cosine schedule
    # then stretches from the resumed step on; keep ``steps`` for a bit-exact continuation).
    RESUMABLE_CHANGES = ("out_dir", "device", "save_every", "keep_checkpoints", "log_every", "max_minutes",
                         "progress", "save_dtype", "steps")

    def check_resumable(self, saved: dict[str, Any]) -> None:
        """Refuse to resume a run whose recorded config differs in anything that changes the training."""
        now = self.to_json()
        diffs = [f.name for f in fields(self)
                 if f.name not in self.RESUMABLE_CHANGES and now.get(f.name) != saved.get(f.name)]
        if diffs:
            raise ValueError(f"{self.out_dir} holds a run with a different config ({', '.join(diffs)}); "
                             "resume with the same settings or choose another output directory")

    def with_(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)
