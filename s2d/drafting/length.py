"""Draft length schedules. Each drafter owns one, so each target's tuning stays its own."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DraftLength:
    """How many tokens to draft next.

    ``fixed``: always ``initial``. ``heuristic`` (transformers' assisted-generation schedule):
    +2 after a fully accepted draft, -1 otherwise, kept within [minimum, maximum].
    """

    initial: int = 5
    schedule: str = "fixed"  # "fixed" | "heuristic"
    minimum: int = 1
    maximum: int = 16

    def __post_init__(self) -> None:
        if self.schedule not in ("fixed", "heuristic"):
            raise ValueError(f"unknown draft length schedule {self.schedule!r} (fixed, heuristic)")
        if not 1 <= self.minimum <= self.initial <= self.maximum:
            raise ValueError(f"need 1 <= minimum <= initial <= maximum, got {self.minimum}, {self.initial}, "
                             f"{self.maximum}")
        self.current = self.initial

    def reset(self) -> None:
        self.current = self.initial

    def update(self, num_proposed: int, num_accepted: int) -> None:
        if self.schedule != "heuristic" or num_proposed == 0:
            return
        step = 2 if num_accepted == num_proposed else -1
        self.current = max(self.minimum, min(self.maximum, self.current + step))
