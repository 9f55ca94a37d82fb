"""The Engine: one target, its drafter and the one KV cache it owns; plain decoding when the drafter is None.

The decoding itself is stateless (``decode.py``); the Engine owns a cache and makes sure one sequence
at a time uses it, from any thread: a ``stream()``/``generate()`` holds it until it ends, a ``start()``ed
sequence until it finishes or the next ``start()`` takes its place, and every entry point refuses
(``EngineBusyError``) rather than interleave two sequences on one cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from s2d.decode import (DecodeState, DecodeStats, InputError, add_by_position, add_histogram, as_token_ids,
                        decode_step, decode_step_batch, prefill)
from s2d.drafting.base import Drafter
from s2d.model.cache import KVCache
from s2d.model.llama import Transformer
from s2d.sampling import SamplingParams

if TYPE_CHECKING:
    from s2d.drafting import DraftOptions
    from s2d.goodput import Allocation

__all__ = ["DecodeState", "DecodeStats", "Engine", "EngineBusyError", "InputError", "MultiTargetEngine",
           "add_by_position", "add_histogram", "as_token_ids"]


class EngineBusyError(RuntimeError):
    """A second sequence on an Engine whose cache another unfinished sequence is using."""


def check_drafter(target: Transformer, drafter: Drafter | None) -> None:
    """Refuse a drafter whose model's token ids mean something else than the target's."""
    model = None if drafter is None else drafter.draft_model
    if model is not None and model.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"draft vocab_size {model.cfg.vocab_size} != target vocab_size "
                         f"{target.cfg.vocab_size}; speculative decoding needs the same vocabulary")


class Engine:
    """One target model, optionally a drafter (bound to this target: ``build_drafter(..., target=)``)."""

    def __init__(self, target: Transformer, drafter: Drafter | None = None, num_draft_tokens: int = 5,
                 eos_token_ids: tuple[int, ...] | None = None) -> None:
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}")
        check_drafter(target, drafter)
        self.target = target
        self.drafter = drafter
        self.num_draft_tokens = num_draft_tokens
        self.eos = frozenset(target.cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self._cache: KVCache | None = None  # reused across requests: allocation is not free for big models
        self._batch_caches: list[KVCache] = []  # the caches of a batch's other sequences, kept for the next batch
        # One operation on the cache at a time (a start, a step), from any thread; ``_owner`` is the
        # sequence the cache holds, ``_streaming`` whether a stream() holds it to its end.
        self._mutex = threading.Lock()
        self._owner: DecodeState | None = None
        self._streaming = False

    @property
    def cache(self) -> KVCache:
        """The cache of start()/stream()/generate(), allocated on first use (a server's slots bring their own)."""
        if self._cache is None:
            self._cache = self.target.new_cache()
        return self._cache

    @property
    def context(self) -> int:
        """The most tokens (prompt + output) one sequence may hold."""
        return self.target.cfg.max_positions

    def start(self, prompt: list[int], params: SamplingParams, max_new_tokens: int) -> DecodeState:
        """Validate the request and prefill the target with all prompt tokens but the last.

        A later start() on this Engine takes its cache over: stepping an earlier state then raises.
        """
        with self._mutex:
            if self._streaming:
                raise EngineBusyError(self._busy_message())
            state = prefill(self.target, prompt, params, max_new_tokens, self.cache, self.drafter,
                            self.num_draft_tokens)
            self._owner = state
            return state

    def _busy_message(self) -> str:
        held = "an unfinished stream()" if self._streaming else "a sequence begun with start() and not finished"
        return (f"this Engine is already decoding a sequence ({held}): finish it or close() it first; one Engine "
                "decodes one sequence at a time (use one Engine per concurrent sequence)")

    def step(self, state: DecodeState) -> list[int]:
        """One target pass of the sequence that holds this Engine's cache: the tokens it emitted."""
        with self._mutex:
            if state is not self._owner:
                raise EngineBusyError("this sequence does not own the Engine's cache (another one was started on the "
                                      "same Engine since, or it was not started here); one Engine decodes one "
                                      "sequence at a time, and it no longer owns the cache")
            return decode_step(self.target, state, self.eos)

    def stream(self, prompt: list[int], params: SamplingParams, max_new_tokens: int,
               state_out: list[DecodeState] | None = None) -> Iterator[list[int]]:
        """Yield the tokens of each step; the final state (with stats) is appended to ``state_out``."""
        with self._held():
            t0 = time.perf_counter()
            with self._mutex:
                state = prefill(self.target, prompt, params, max_new_tokens, self.cache, self.drafter,
                                self.num_draft_tokens)
                self._owner = state
            if state_out is not None:
                state_out.append(state)
            while not state.finished:
                emitted = self.step(state)
                state.stats.elapsed_s = time.perf_counter() - t0
                yield emitted

    @contextmanager
    def _held(self) -> Iterator[None]:
        """The cache for one stream or batch, to its end: refused while another sequence holds it; released
        also when the caller stops iterating (close(), or garbage collection, runs the finally)."""
        with self._mutex:
            if self._streaming or (self._owner is not None and not self._owner.finished):
                raise EngineBusyError(self._busy_message())
            self._streaming = True
        try:
            yield
        finally:
            with self._mutex:
                self._streaming = False
                if self._owner is not None:
                    self._owner.finished = True  # a stream's sequence ends with it: nobody steps it again

    def generate(self, prompt: list[int], params: SamplingParams = SamplingParams(),
                 max_new_tokens: int = 128) -> DecodeState:
        states: list[DecodeState] = []
        for _ in self.stream(prompt, params, max_new_tokens, states):
            pass
        return states[0]

    def stream_batch(self, prompts: list[list[int]], params: "SamplingParams | list[SamplingParams]" = SamplingParams(),
                     max_new_tokens: "int | list[int]" = 128, drafters: "list[Drafter | None] | None" = None,
                     state_out: list[DecodeState] | None = None,
                     goodput: "bool | Allocation" = True) -> Iterator[list[list[int]]]:
        """Decode several sequences together: every step drafts for each and verifies all of them in one
        target pass (``decode_step_batch``). Yields, per step, each sequence's new tokens (empty once it
        has finished); the states (with stats) are appended to ``state_out``. ``params`` and
        ``max_new_tokens`` may be one for all or one per prompt. ``drafters``: one per sequence (a drafter
        holds one sequence's state); without them, the Engine's drafter serves a batch of one.

        Each sequence's tokens are the ones ``generate`` gives it alone (greedy: bit-identical rows;
        seeded sampling: the same draws, from its own generator). ``goodput``: draft lengths chosen for the
        batch (``s2d/goodput.py``); False: each sequence drafts its method's length; or another allocation
        (``goodput.allocate``'s signature)."""
        n = len(prompts)
        if not isinstance(prompts, (list, tuple)) or n == 0:
            raise InputError("a batch needs a non-empty list of prompts")
        every_params = list(params) if isinstance(params, (list, tuple)) else [params] * n
        every_max = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
        if drafters is None:
            if self.drafter is not None and n > 1:
                raise ValueError("each sequence of a batch needs a drafter of its own (drafters=[...], built with "
                                 "build_drafter(..., target=)); MultiTargetEngine.generate_batch builds them")
            drafters = [self.drafter] * n
        if not len(every_params) == len(every_max) == len(drafters) == n:
            raise InputError(f"{n} prompts need as many params, max_new_tokens and drafters, got "
                             f"{len(every_params)}, {len(every_max)}, {len(drafters)}")
        for drafter in drafters:
            check_drafter(self.target, drafter)
        if len({id(d) for d in drafters if d is not None}) < sum(d is not None for d in drafters):
            raise ValueError("two sequences of a batch share one drafter; each needs its own")
        with self._held():
            t0 = time.perf_counter()
            while len(self._batch_caches) < n - 1:
                self._batch_caches.append(self.target.new_cache())
            caches = [self.cache, *self._batch_caches[:n - 1]]
            states = []
            with self._mutex:
                for i in range(n):
                    try:
                        states.append(prefill(self.target, prompts[i], every_params[i], every_max[i], caches[i],
                                              drafters[i], self.num_draft_tokens))
                    except (InputError, TypeError) as err:
                        raise type(err)(f"prompt {i} of the batch: {err}") from None
                self._owner = states[0]
            if state_out is not None:
                state_out.extend(states)
            while any(not s.finished for s in states):
                active = [i for i, s in enumerate(states) if not s.finished]
                with self._mutex:
                    results = decode_step_batch(self.target, [states[i] for i in active], self.eos, goodput)
                new: list[list[int]] = [[] for _ in range(n)]
                for i, result in zip(active, results):
                    if isinstance(result, Exception):
                        raise result
                    new[i] = result
                    states[i].stats.elapsed_s = time.perf_counter() - t0
                yield new

    def generate_batch(self, prompts: list[list[int]],
                       params: "SamplingParams | list[SamplingParams]" = SamplingParams(),
                       max_new_tokens: "int | list[int]" = 128, drafters: "list[Drafter | None] | None" = None,
                       goodput: bool = True) -> list[DecodeState]:
        """``stream_batch`` to the end: each sequence's final state (its output and statistics)."""
        states: list[DecodeState] = []
        for _ in self.stream_batch(prompts, params, max_new_tokens, drafters, states, goodput):
            pass
        return states


class MultiTargetEngine:
    """Several targets sharing a tokenizer and one draft model in memory.

    Each target gets its own Engine: its own KV cache, its own drafter state (cache, adaptive draft
    length) and its own running statistics, so one target's tuning never leaks into another's.
    """

    def __init__(self, targets: dict[str, Transformer], draft: Transformer | None = None, method: str = "s2d",
                 options: "DraftOptions | dict[str, DraftOptions] | None" = None,
                 eos_token_ids: tuple[int, ...] | None = None) -> None:
        """``eos_token_ids``: stop tokens of every target (default: each target's own; () never stops)."""
        from s2d.drafting import build_drafter, default_options, engine_draft_tokens

        if not targets:
            raise ValueError("MultiTargetEngine needs at least one target")
        self.method = method
        self.draft = draft
        self.engines: dict[str, Engine] = {}
        self.totals: dict[str, DecodeStats] = {}
        self.options: dict[str, DraftOptions] = {}
        self._batch_drafters: dict[str, list[Drafter | None]] = {}  # per target, kept across batches
        for name, target in targets.items():
            if draft is not None and draft.cfg.vocab_size != target.cfg.vocab_size:
                raise ValueError(f"draft vocab_size {draft.cfg.vocab_size} != target {name!r} vocab_size "
                                 f"{target.cfg.vocab_size}")
            base = default_options(method, draft)
            opts = options.get(name, base) if isinstance(options, dict) else (options or base)
            drafter = build_drafter(method, draft, opts, target)
            self.engines[name] = Engine(target, drafter, engine_draft_tokens(method, opts), eos_token_ids)
            self.totals[name] = DecodeStats()
            self.options[name] = opts
            self._batch_drafters[name] = [drafter]

    def engine(self, name: str) -> Engine:
        if name not in self.engines:
            raise KeyError(f"unknown target {name!r}; loaded: {', '.join(self.engines)}")
        return self.engines[name]

    def stream(self, name: str, prompt: list[int], params: SamplingParams, max_new_tokens: int,
               state_out: list[DecodeState] | None = None) -> Iterator[list[int]]:
        states: list[DecodeState] = [] if state_out is None else state_out
        yield from self.engine(name).stream(prompt, params, max_new_tokens, states)
        self._accumulate(name, states[-1].stats)

    def generate(self, name: str, prompt: list[int], params: SamplingParams = SamplingParams(),
                 max_new_tokens: int = 128) -> DecodeState:
        state = self.engine(name).generate(prompt, params, max_new_tokens)
        self._accumulate(name, state.stats)
        return state

    def generate_batch(self, name: str, prompts: list[list[int]],
                       params: "SamplingParams | list[SamplingParams]" = SamplingParams(),
                       max_new_tokens: "int | list[int]" = 128, goodput: bool = True) -> list[DecodeState]:
        """Several sequences on one target, verified together (``Engine.stream_batch``); each sequence gets a
        drafter of its own, built like the target's (and kept for later batches)."""
        from s2d.drafting import build_drafter

        engine = self.engine(name)
        drafters = self._batch_drafters[name]
        while len(drafters) < len(prompts):
            drafters.append(build_drafter(self.method, self.draft, self.options[name], engine.target))
        states = engine.generate_batch(prompts, params, max_new_tokens, drafters[:len(prompts)], goodput)
        for state in states:
            self._accumulate(name, state.stats)
        return states

    def _accumulate(self, name: str, stats: DecodeStats) -> None:
        self.totals[name].merge(stats)
