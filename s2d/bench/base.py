"""What benchmark entries are made of: the timed result, the run's options, the shared model store.

A leaf of ``s2d.bench``: the registry (``registry.py``) and the entries (``methods.py`` ours,
``peers.py`` transformers', ``llamacpp.py`` llama.cpp's) import it; it imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from s2d.sampling import SamplingParams

T = TypeVar("T")


@dataclass
class Generation:
    """One timed generate call, reported the same way by our engine and by the peers."""

    tokens: list[int]  # the new tokens only
    elapsed_s: float  # the whole call: prefill + decoding; loading excluded
    target_passes: int | None  # target forward passes; None when the method cannot count them
    proposed_at: list[int] = field(default_factory=list)  # [i]: draft tokens proposed at position i
    accepted_at: list[int] = field(default_factory=list)  # [i]: of those, accepted
    exit_counts: dict[int, int] = field(default_factory=dict)  # exit layer -> draft tokens it produced
    draft_s: float | None = None  # of elapsed_s: proposing drafts (None: the method cannot tell)
    verify_s: float | None = None  # of elapsed_s: target passes after the prefill


class Runner(Protocol):
    """A benchmark entry ready to time: ours behind the engine, or a peer."""

    def generate(self, prompt: list[int], params: SamplingParams, max_new_tokens: int) -> Generation: ...


@dataclass(frozen=True)
class MethodOptions:
    """Knobs shared by all methods of one run (from the CLI)."""

    dtype: str = "bfloat16"
    device: str = "cpu"
    num_draft_tokens: int | None = None  # our drafters' tokens per step; None: each method's default
    ignore_eos: bool = False  # generate exactly max_new_tokens (EOS does not stop)
    assistant_exit: int | None = None  # hf-assisted: exit of a sorted draft to export; None = deepest
    num_assistant_tokens: int | None = None  # hf-assisted: None = transformers' default
    assistant_confidence_threshold: float | None = None  # hf-assisted: None = transformers' default
    prompt_lookup_num_tokens: int = 10  # hf-pld, llamacpp-lookup (transformers' documented example value)
    tree: tuple[int, int, int] | None = None  # s2d-tree, rsd, rsd-sbs: (top-k, depth, nodes); None: their defaults


class ModelStore:
    """Loads each checkpoint once per run, so methods on one target (and all targets) share weights."""

    def __init__(self) -> None:
        self._loaded: dict[tuple[Any, ...], Any] = {}

    def get(self, key: tuple[Any, ...], load: Callable[[], T]) -> T:
        if key not in self._loaded:
            self._loaded[key] = load()
        return self._loaded[key]

    def release(self, path: Path) -> None:
        """Drop everything loaded from ``path`` (a finished target) to bound memory."""
        for key in [k for k in self._loaded if path in k]:
            del self._loaded[key]


@dataclass
class MethodContext:
    """What a factory may use to build a method for one target."""

    target: Path
    draft: Path | None
    options: MethodOptions
    models: ModelStore


class MethodSkipped(Exception):
    """A factory declines a method for this target (e.g. the draft *is* the target); the run goes on."""
