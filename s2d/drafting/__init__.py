"""Drafting methods by name: the one place that maps a method name to a Drafter."""

from __future__ import annotations

import re
from dataclasses import dataclass

from s2d.drafting.base import Draft, Drafter
from s2d.drafting.length import DraftLength
from s2d.drafting.lookup import PromptLookupDrafter
from s2d.drafting.model import ModelDrafter
from s2d.drafting.sorted import SortedConfig, SortedDrafter
from s2d.model.llama import Transformer

METHODS = ("ar", "sd", "pld", "sd-exit-E", "s2d")
_EXIT = re.compile(r"sd-exit-(\d+)$")


@dataclass(frozen=True)
class DraftOptions:
    """Knobs of one target's drafter (a calibration may set them per target)."""

    num_draft_tokens: int = 5
    schedule: str = "fixed"  # "fixed" | "heuristic" (+2 after full acceptance, -1 otherwise)
    exit_thresholds: tuple[float, ...] = ()  # s2d: per exit; () = the paper's 0.5, ..., 0.5, 0
    stop_threshold: float = 0.0  # end a draft after a token whose confidence is below this

    def __post_init__(self) -> None:
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")
        if self.schedule not in ("fixed", "heuristic"):
            raise ValueError(f"unknown draft schedule {self.schedule!r} (fixed, heuristic)")
        if not all(0.0 <= t <= 1.0 for t in (*self.exit_thresholds, self.stop_threshold)):
            raise ValueError("exit and stop thresholds must lie in [0, 1]")


def needs_draft_model(method: str) -> bool:
    return method == "sd" or method == "s2d" or bool(_EXIT.match(method))


def check_method(method: str) -> None:
    if method not in ("ar", "sd", "pld", "s2d") and not _EXIT.match(method):
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)} (E = an exit layer count)")


def sorted_exits(draft: Transformer) -> tuple[int, ...]:
    """The draft's exits (config ``s2d_exits``); a plain model has one exit, its last layer."""
    return draft.cfg.exits or (draft.cfg.num_layers,)


def build_drafter(method: str, draft: Transformer | None, options: DraftOptions = DraftOptions()) -> Drafter | None:
    """A fresh drafter for one target. Drafters built from the same ``draft`` share its weights."""
    check_method(method)
    if method == "ar":
        return None
    if method == "pld":
        return PromptLookupDrafter()
    if draft is None:
        raise ValueError(f"method {method!r} needs a draft model (--draft)")
    length = DraftLength(options.num_draft_tokens, options.schedule, maximum=max(16, options.num_draft_tokens))
    if method == "sd":
        return ModelDrafter(draft, length)
    if method == "s2d":
        exits = sorted_exits(draft)
        config = SortedConfig(exits, options.exit_thresholds, options.stop_threshold)
        return SortedDrafter(draft, config, length)
    exit_layers = int(_EXIT.match(method).group(1))
    if not 1 <= exit_layers <= draft.cfg.num_layers:
        raise ValueError(f"{method}: the draft has {draft.cfg.num_layers} layers")
    return SortedDrafter(draft, SortedConfig((exit_layers,), (0.0,), options.stop_threshold), length)


__all__ = ["Draft", "Drafter", "DraftLength", "DraftOptions", "ModelDrafter", "PromptLookupDrafter", "SortedConfig",
           "SortedDrafter", "build_drafter", "check_method", "needs_draft_model", "sorted_exits", "METHODS"]
