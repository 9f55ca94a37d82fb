"""Benchmark methods by name: one registry of factories, so a new decoder plugs in with one entry.

A method is registered under a pattern such as ``"sd"`` or ``"sd-exit-{E}"``; ``{E}`` matches a
non-negative integer that is passed to the factory as the keyword argument ``E``. The runner only
ever calls ``build_method(name, context)`` and ``Method.generate``: no method names in its loop.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from s2d.bench.errors import BenchError
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


class Method(Protocol):
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


Factory = Callable[..., Method]


@dataclass(frozen=True)
class MethodSpec:
    pattern: str  # as shown to users, e.g. "sd-exit-{E}"
    factory: Factory
    needs_draft: bool
    help: str
    regex: re.Pattern[str]

    def match(self, name: str) -> dict[str, int] | None:
        m = self.regex.fullmatch(name)
        return None if m is None else {k: int(v) for k, v in m.groupdict().items()}


_REGISTRY: list[MethodSpec] = []


def register(pattern: str, *, needs_draft: bool = False, help: str = "") -> Callable[[Factory], Factory]:
    """Decorator: ``@register("sd-exit-{E}", needs_draft=True)`` over ``def f(ctx, E) -> Method``."""
    regex = re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(pattern)))

    def add(factory: Factory) -> Factory:
        if any(spec.pattern == pattern for spec in _REGISTRY):
            raise ValueError(f"method {pattern!r} is registered twice")
        _REGISTRY.append(MethodSpec(pattern, factory, needs_draft, help, regex))
        return factory

    return add


def _load_builtins() -> None:
    # Imported for their @register side effects; late, because they import this module.
    import s2d.bench.methods  # noqa: F401
    import s2d.bench.peers  # noqa: F401
    import s2d.bench.llamacpp  # noqa: F401


def method_specs() -> list[MethodSpec]:
    _load_builtins()
    return list(_REGISTRY)


def resolve(name: str) -> tuple[MethodSpec, dict[str, int]]:
    """A peer or bench-only method registered here, else one of ours (s2d.drafting.methods)."""
    for spec in method_specs():
        params = spec.match(name)
        if params is not None:
            return spec, params
    from s2d.bench.methods import ours
    from s2d.drafting import METHODS, parse_method

    try:
        method = parse_method(name)
    except ValueError:
        known = ", ".join([*METHODS, *(spec.pattern for spec in _REGISTRY)])
        raise BenchError(f"unknown method {name!r}; known methods: {known}") from None
    return MethodSpec(name, lambda ctx: ours(ctx, name), method.needs_draft, "", re.compile(re.escape(name))), {}


def parse_methods(text: str, have_draft: bool) -> list[str]:
    """Split and validate a comma-separated method list before any model is loaded."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise BenchError("--methods is empty")
    if len(set(names)) != len(names):
        raise BenchError(f"--methods lists a method twice: {text}")
    for name in names:
        spec, _ = resolve(name)
        if spec.needs_draft and not have_draft:
            raise BenchError(f"method {name!r} needs a draft model: pass --draft DIR")
    return names


def build_method(name: str, ctx: MethodContext) -> Method:
    """The method for one target; may raise MethodSkipped."""
    spec, params = resolve(name)
    return spec.factory(ctx, **params)
