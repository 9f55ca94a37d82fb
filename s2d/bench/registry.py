"""Benchmark entries by name: our decoding methods (the table in ``s2d.drafting.methods``) and the peers.

A peer (another engine: transformers', llama.cpp's) or a bench-only variant of ours is one row of
``PEERS``, in the shape of the method table's rows: a name pattern (``{E}`` matches a non-negative
integer, passed to the builder as ``E``), whether it needs ``--draft``, a help text, and its builder.
Any other name is one of our methods, built as the CLI builds it. The runner only ever calls
``build_method(name, context)`` and ``Runner.generate``: no method names in its loop.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from s2d.bench import llamacpp, methods, peers
from s2d.bench.base import (Generation, MethodContext, MethodOptions, MethodSkipped, ModelStore, Runner)
from s2d.bench.errors import BenchError
from s2d.drafting import METHODS, parse_method

__all__ = ["Generation", "MethodContext", "MethodOptions", "MethodSkipped", "ModelStore", "PEERS", "PeerSpec",
           "Runner", "build_method", "method_specs", "parse_methods", "resolve"]


@dataclass(frozen=True)
class PeerSpec:
    """One benchmark entry that is not a plain method of ours."""

    pattern: str  # as shown to users, e.g. "hf-assisted"
    help: str
    build: Callable[..., Runner]  # (context, **pattern parameters) -> the entry for one target
    needs_draft: bool = False

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(self.pattern)))

    def match(self, name: str) -> dict[str, int] | None:
        m = self.regex.fullmatch(name)
        return None if m is None else {k: int(v) for k, v in m.groupdict().items()}


PEERS: tuple[PeerSpec, ...] = (
    PeerSpec("s2d-cal", "s2d with the per-target calibration stored beside the draft (`s2d calibrate`); defaults "
             "without one", methods.s2d_calibrated, needs_draft=True),
    PeerSpec("hf-ar", "transformers generate(), plain decoding", peers.hf_ar),
    PeerSpec("hf-assisted", "transformers assisted generation with --draft as assistant_model (--assistant-exit for "
             "sorted drafts)", peers.hf_assisted, needs_draft=True),
    PeerSpec("hf-pld", "transformers prompt lookup decoding (prompt_lookup_num_tokens)", peers.hf_pld),
    PeerSpec("llamacpp", "llama.cpp (llama-cpp-python) plain decoding of the target exported to GGUF",
             llamacpp.llamacpp),
    PeerSpec("llamacpp-lookup", "llama-cpp-python's prompt lookup drafter (LlamaPromptLookupDecoding; "
             "--prompt-lookup-num-tokens)", llamacpp.llamacpp_lookup),
)


def method_specs() -> list[PeerSpec]:
    """The peers and bench-only entries (our methods are listed by ``s2d.drafting.METHOD_HELP``)."""
    return list(PEERS)


def resolve(name: str) -> tuple[PeerSpec, dict[str, int]]:
    """A peer or bench-only entry, else one of our methods (s2d.drafting.methods)."""
    for spec in PEERS:
        params = spec.match(name)
        if params is not None:
            return spec, params
    try:
        method = parse_method(name)
    except ValueError:
        known = ", ".join([*METHODS, *(spec.pattern for spec in PEERS)])
        raise BenchError(f"unknown method {name!r}; known methods: {known}") from None
    return PeerSpec(name, "", lambda ctx: methods.ours(ctx, name), method.needs_draft), {}


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


def build_method(name: str, ctx: MethodContext) -> Runner:
    """The entry for one target; may raise MethodSkipped."""
    spec, params = resolve(name)
    return spec.build(ctx, **params)
