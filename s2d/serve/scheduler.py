"""Serving several sequences at once: per-target slot pools and one thread that steps them in turn.

Each target has a pool of *slots*; a slot is one sequence's target KV cache and its drafters (their
caches and adaptive state), built lazily up to ``max_slots``. A request holds a slot from admission
to its end, so sequences never share mutable state; the model weights are shared by every slot.

One scheduler thread runs all model work (prefill and decode steps): each step takes every admitted
sequence of one target (continuous batching: sequences join and leave between steps), each drafts, and
one target pass verifies all their blocks (``decode_step_batch``: the weights are read once for all
rows); the targets take turns. Prompts are prefilled in chunks (chunked prefill): a step first runs at
most ``prefill_chunk`` prompt tokens of the target's newly admitted sequences (the shortest remaining
prompt first, so a short request is not held behind a long one), then the decode step of every sequence
whose prompt is in, so no decoding sequence waits for more than one chunk of someone's prefill. On a CPU
the cores serve one pass at a time, and a single thread keeps
torch's and the native runtime's thread teams from fighting. Requests wait in a bounded FIFO (a full queue is
refused at once: the server answers 503), and a request cancelled by its client stops at its next step.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from s2d.decode import DecodeState, begin, decode_step_batch, prefill_chunk, reusable_prefix
from s2d.drafting import DraftOptions, build_drafter, engine_draft_tokens
from s2d.drafting.base import Drafter, common_prefix
from s2d.engine import Engine
from s2d.model.cache import KVCache
from s2d.model.llama import Transformer
from s2d.sampling import SamplingParams
from s2d.serve import DEFAULT_PREFILL_CHUNK
from s2d.serve.text import TextStream


class QueueFullError(RuntimeError):
    """The server holds as many waiting requests as it may: try again later."""


@dataclass(frozen=True)
class Request:
    """One sequence to decode, validated by the caller (the HTTP layer)."""

    target: str
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    method: str
    stop: tuple[str, ...] = ()
    max_draft_tokens: int | None = None  # at most this many draft tokens per step; 0: no speculation


@dataclass
class Event:
    """What the scheduler tells a request's owner: new text, the end, or a failure."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # with "done": "stop" (end-of-sequence or a stop string) or "length"
    error: BaseException | None = None  # with "error"


@dataclass
class Job:
    request: Request
    on_event: Callable[[Event], None]  # called from the scheduler thread
    text: TextStream
    id: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    state: DecodeState | None = None
    cancelled: bool = False
    slot: Slot | None = None

    def cancel(self) -> None:
        """Stop this request at its next step (a client that went away); safe from any thread."""
        self.cancelled = True


@dataclass
class Slot:
    cache: KVCache
    drafters: dict[str, tuple[Drafter | None, int]] = field(default_factory=dict)  # method -> (drafter, k)
    busy: bool = False
    # the token ids whose keys and values the cache holds at [0, len): the last request's, once it ended
    # normally (empty while one runs or after one failed); a new prompt keeps their common prefix
    tokens: list[int] = field(default_factory=list)


class TargetPool:
    """One target's engine and its slots."""

    def __init__(self, engine: Engine, draft: Transformer | None, options: Callable[[str], DraftOptions],
                 max_slots: int) -> None:
        self.engine = engine
        self.draft = draft
        self.options = options  # method -> the drafting knobs this target uses with it
        self.max_slots = max_slots
        self.slots: list[Slot] = []

    def acquire(self, prompt: list[int]) -> Slot | None:
        """A free slot, the one whose cache holds the longest prefix of ``prompt`` (as llama-server's prompt
        cache; the first among equals), or a new one where none is free."""
        free = [slot for slot in self.slots if not slot.busy]
        if free:
            slot = max(free, key=lambda slot: common_prefix(slot.tokens, prompt))
            slot.busy = True
            return slot
        if len(self.slots) < self.max_slots:
            slot = Slot(self.engine.target.new_cache(), busy=True)
            self.slots.append(slot)
            return slot
        return None

    def drafter(self, slot: Slot, method: str) -> tuple[Drafter | None, int]:
        """The slot's drafter for ``method``, built on first use (drafters share the draft's weights).

        Drafters learn across a slot's requests (the hybrid's running acceptance); ``decode.begin`` has a
        seeded sampling request forget that history, so it draws exactly as it would alone.
        """
        if method not in slot.drafters:
            opts = self.options(method)
            drafter = build_drafter(method, self.draft, opts, self.engine.target)
            slot.drafters[method] = (drafter, engine_draft_tokens(method, opts))
        return slot.drafters[method]


class Scheduler:
    """Admits requests into free slots and steps every admitted sequence of one target at a time (the targets
    take turns), on its own thread."""

    def __init__(self, pools: dict[str, TargetPool], max_waiting: int = 64,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        """``prefill_chunk``: the most prompt tokens prefilled per step of a target (the others' decode step runs
        between two chunks)."""
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        self.pools = pools
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self._waiting: deque[Job] = deque()
        self._active: deque[Job] = deque()
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self.cancelled = 0  # requests stopped because their client went away
        self.reused_prompt_tokens = 0  # prompt tokens a slot's cache already held (not prefilled again)
        self._admitted = 0
        self._thread = threading.Thread(target=self._run, name="s2d-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop stepping; every unfinished request ends with an error event."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Sequences admitted and not ended (the one being stepped included)."""
        return self._admitted

    def submit(self, job: Job) -> Job:
        if job.request.target not in self.pools:
            raise KeyError(job.request.target)
        with self._lock:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting; retry later")
            job.id = next(self._ids)
            self._waiting.append(job)
            self._lock.notify()
        return job

    def _admit(self) -> list[Job]:
        """Move waiting jobs whose target has a free slot to the active set, oldest first (under the lock)."""
        admitted = []
        for job in list(self._waiting):
            if job.cancelled:
                self._waiting.remove(job)
                self._end(job, Event("done", finish_reason="cancelled"))
                continue
            try:
                slot = self.pools[job.request.target].acquire(job.request.prompt)
            except Exception as err:  # noqa: BLE001 - a KV cache that cannot be allocated fails its request, not the thread
                self._waiting.remove(job)
                self._end(job, Event("error", error=err))
                continue
            if slot is not None:
                job.slot = slot
                self._admitted += 1
                self._waiting.remove(job)
                admitted.append(job)
        return admitted

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._active and not self._waiting:
                    self._lock.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            for job in admitted:  # outside the lock: submit() must not wait for the scheduler
                if self._begin(job):
                    self._active.append(job)
            if not self._active:  # every admitted job failed to begin
                continue
            # Every active sequence of the target at the head of the queue, in one step; they rejoin at the
            # back, so the targets take turns.
            target = self._active[0].request.target
            batch = [job for job in self._active if job.request.target == target]
            self._active = deque(job for job in self._active if job.request.target != target)
            self._active.extend(self._step(batch))
        with self._lock:
            pending = list(self._active) + list(self._waiting)
            self._active.clear()
            self._waiting.clear()
        for job in pending:
            self._end(job, Event("error", error=QueueFullError("the server shut down before this request ended")))

    def _begin(self, job: Job) -> bool:
        r = job.request
        pool = self.pools[r.target]
        try:
            drafter, k = pool.drafter(job.slot, r.method)
            if r.max_draft_tokens == 0:  # no speculation for this request: plain decoding
                drafter, k = None, 1
            elif r.max_draft_tokens is not None:
                k = min(k, r.max_draft_tokens)
            # validated and begun now; its prompt is prefilled chunk by chunk in the steps (_prefill), after
            # what the slot's cache already holds of it
            keep = reusable_prefix(pool.engine.target, job.slot.tokens, r.prompt, self.prefill_chunk)
            job.slot.tokens = []  # the cache is this request's now: nothing reusable until it ends normally
            job.state = begin(pool.engine.target, r.prompt, r.params, r.max_new_tokens, job.slot.cache, drafter, k,
                              keep)
            self.reused_prompt_tokens += keep
        except Exception as err:  # noqa: BLE001 - a drafter that cannot be built, a prompt the engine refuses
            self._end(job, Event("error", error=err))
            return False
        return True

    def _step(self, jobs: list[Job]) -> list[Job]:
        """One step of ``jobs`` (sequences of one target): a chunk of prefill, then the decode step of those
        whose prompt is in; returns those that go on, in their order."""
        for job in jobs:
            if job.cancelled:
                self._end(job, Event("done", finish_reason="cancelled"))
        jobs = [job for job in jobs if not job.cancelled]
        if not jobs:
            return []
        engine = self.pools[jobs[0].request.target].engine
        failed = self._prefill(engine, [job for job in jobs if job.state.unprefilled])
        jobs = [job for job in jobs if id(job) not in failed]
        decoding = [job for job in jobs if not job.state.unprefilled]
        if not decoding:
            return jobs
        try:
            results: list[list[int] | Exception] = decode_step_batch(engine.target,
                                                                     [job.state for job in decoding], engine.eos)
        except Exception as err:  # noqa: BLE001 - a failed pass ends the requests it carried; the others go on
            results = [err] * len(decoding)
        ended = {id(job) for job, result in zip(decoding, results) if not self._advance(job, result, engine)}
        return [job for job in jobs if id(job) not in ended]

    def _prefill(self, engine: Engine, jobs: list[Job]) -> set[int]:
        """Run at most ``prefill_chunk`` prompt tokens of ``jobs`` (still prefilling), the shortest remaining
        first. A prompt is cut at multiples of ``prefill_chunk`` from its start, whatever else is prefilled:
        a chunk runs whole or waits for the next step. Where the cuts fall can change the cache's bits (where
        a chunk of more than 64 rows runs on torch, torch's rounding depends on the shape), so cuts that followed what other requests left of a step made an output depend on the load
        (bf16: 2 of 96 zoo-l completions differed from their sequential runs). Returns the ids of the jobs
        whose prefill failed (ended, their slots freed)."""
        budget = self.prefill_chunk
        failed: set[int] = set()
        for job in sorted(jobs, key=lambda j: j.state.unprefilled):  # stable: equal lengths keep their order
            done = job.state.cache.length
            take = min(self.prefill_chunk - done % self.prefill_chunk, job.state.unprefilled)
            if take > budget:
                continue  # a shorter chunk of another job may still fit; the first chunk always does
            try:
                prefill_chunk(engine.target, job.state, take)
            except Exception as err:  # noqa: BLE001 - this request ends; the others' caches are their own
                job.state.finished = True
                self._end(job, Event("error", error=err))
                failed.add(id(job))
            budget -= take
        return failed

    def _advance(self, job: Job, result: list[int] | Exception, engine: Engine) -> bool:
        """Hand one step's tokens to ``job``'s owner; False when the request has ended."""
        state = job.state
        try:
            if isinstance(result, Exception):
                raise result
            emitted = result
            state.stats.elapsed_s = time.perf_counter() - job.submitted_at
            delta, stopped = job.text.push(state.output)
        except Exception as err:  # noqa: BLE001 - non-finite logits, a tokenizer failure: this request ends, others go on
            self._end(job, Event("error", error=err))
            return False
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        if stopped:
            state.finished = True
        elif state.finished:
            delta += job.text.flush()
        if delta:
            self._emit(job, Event("text", delta))
        if not state.finished:
            return True
        hit_eos = stopped or (bool(emitted) and emitted[-1] in engine.eos)
        job.slot.tokens = state.tokens[:min(state.cache.length, len(state.tokens))]
        self._end(job, Event("done", finish_reason="stop" if hit_eos else "length"))
        return False

    def _end(self, job: Job, event: Event) -> None:
        job.finished_at = time.perf_counter()
        self.cancelled += event.finish_reason == "cancelled"
        if job.slot is not None:
            job.slot.busy = False  # the next begin() on it keeps what it can reuse and resets its drafters
            job.slot = None
            self._admitted -= 1
        self._emit(job, event)

    @staticmethod
    def _emit(job: Job, event: Event) -> None:
        try:
            job.on_event(event)
        except Exception:  # noqa: BLE001 - an owner that went away (its loop closed) must not stop the scheduler
            job.cancelled = True
