"""Chunked prefill (issue 26, part 4): a prompt run into the cache in chunks gives the cache and the output a
whole prefill gives; the server prefills a long prompt chunk by chunk with the other sequences' decode steps
between the chunks, and a request that fails or is cancelled mid-prefill frees its slot and leaves the others
as they were."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from s2d import decode
from s2d.decode import InputError, begin, decode_step, prefill, prefill_chunk
from s2d.drafting import build_drafter, default_options, engine_draft_tokens
from s2d.model import native
from s2d.model.loading import load_family, load_model
from s2d.sampling import SamplingParams
from s2d.serve import scheduler
from s2d.serve.app import Server, ServerConfig
from s2d.serve.scheduler import Event, Job, Request
from s2d.serve.text import TextStream

# 300 tokens: the chunks cross the native runtime's 64-row passes and the attention's 256-key chunks.
LONG = [(i * 37 + 11) % 250 + 1 for i in range(300)]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def models(request, checkpoints, sorted_draft_dir):
    if request.param == "bfloat16" and native.library() is None:
        pytest.skip("bf16 on the torch path is not the configuration served")
    return load_model(checkpoints["target"], dtype=request.param), load_model(sorted_draft_dir, dtype=request.param)


def _decode(target, state):
    while not state.finished:
        decode_step(target, state, frozenset())
    return state.output


@pytest.mark.parametrize("chunk", [1, 7, 64, 100, 299])
def test_a_chunked_prefill_equals_a_whole_one(models, chunk):
    target, draft = models
    whole = prefill(target, LONG, SamplingParams(), 8, target.new_cache(), None, 1)
    state = begin(target, LONG, SamplingParams(), 8, target.new_cache(), None, 1)
    assert state.unprefilled == len(LONG) - 1 and state.cache.length == 0
    remaining = [prefill_chunk(target, state, chunk) for _ in range(-(-(len(LONG) - 1) // chunk))]
    assert remaining == list(range(len(LONG) - 1 - chunk, 0, -chunk)) + [0]
    assert state.unprefilled == 0 and state.cache.length == whole.cache.length == len(LONG) - 1
    n = whole.cache.length
    if target.dtype == torch.float32:  # the same keys and values up to the kernels' float32 rounding
        for a, b in ((state.cache.k, whole.cache.k), (state.cache.v, whole.cache.v)):
            torch.testing.assert_close(a[..., :n, :].float(), b[..., :n, :].float(), rtol=1e-5, atol=1e-5)
        last = torch.tensor([[LONG[-1]]])
        at = torch.tensor([n])
        logits = [target(last, at, s.cache, logits_at=slice(None))[0, -1] for s in (state, whole)]
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    for method in ("ar", "sd-exit-2", "s2d"):  # greedy outputs identical, with and without a draft
        outs = []
        for chunked in (True, False):
            drafter = build_drafter(method, draft, default_options(method, draft), target)
            k = engine_draft_tokens(method, default_options(method, draft))
            s = begin(target, LONG, SamplingParams(), 24, target.new_cache(), drafter, k)
            while prefill_chunk(target, s, chunk if chunked else None):
                pass
            outs.append(_decode(target, s))
        assert outs[0] == outs[1], method


def test_prefill_chunk_refusals(models):
    target, _ = models
    state = begin(target, LONG[:20], SamplingParams(), 4, target.new_cache(), None, 1)
    with pytest.raises(InputError, match="still to prefill"):
        decode_step(target, state, frozenset())
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_tokens"):
            prefill_chunk(target, state, bad)
    assert prefill_chunk(target, state, 100) == 0
    decode_step(target, state, frozenset())
    with pytest.raises(InputError, match="prefill is done"):
        prefill_chunk(target, state)
    with pytest.raises(InputError, match="context"):  # too long: refused before anything is run
        begin(target, LONG, SamplingParams(), target.cfg.max_positions, target.new_cache(), None, 1)


# --- the server: chunks interleaved with the others' decode steps ----------------------------------------------

@pytest.fixture(scope="module")
def family(checkpoints, sorted_draft_dir):
    return load_family({"a": str(checkpoints["target"])}, str(sorted_draft_dir), "float32", "cpu")


def alone(family, prompt: list[int], method: str, max_new: int, params: SamplingParams | None = None) -> list[int]:
    """The request decoded alone through the engine (a whole prefill)."""
    from s2d.engine import MultiTargetEngine

    _, models, draft = family
    engine = MultiTargetEngine({"a": models["a"]}, draft, method)
    return engine.generate("a", prompt, params or SamplingParams(), max_new).output


class Run:
    """Jobs submitted to a scheduler before its thread starts (so all are admitted in its first step), with an
    ordered log of its model work: ("prefill", job, tokens) and ("step", jobs)."""

    def __init__(self, family, chunk: int, monkeypatch, fail_prefill=None, on_prefill=None, max_slots: int = 8) -> None:
        tokenizer, models, draft = family
        self.server = Server(tokenizer, models, draft, ServerConfig(max_slots=max_slots, prefill_chunk=chunk))
        self.log: list[tuple] = []
        self.jobs: list[Job] = []
        self.events: dict[int, list[Event]] = {}
        self.done: dict[int, threading.Event] = {}
        # the functions themselves (not the scheduler's names, which an earlier Run of the test may have patched)
        real_chunk, real_step, real_begin = decode.prefill_chunk, decode.decode_step_batch, decode.begin
        state_job = {}

        def spy_chunk(target, state, max_tokens=None):
            job = state_job[id(state)]
            self.log.append(("prefill", job, min(max_tokens, state.unprefilled)))
            if on_prefill is not None:
                on_prefill(self, job)
            if fail_prefill is not None and fail_prefill(self, job):
                raise RuntimeError("a prefill pass failed")
            return real_chunk(target, state, max_tokens)

        def spy_step(target, states, eos):
            self.log.append(("step", [state_job[id(s)] for s in states]))
            return real_step(target, states, eos)

        def spy_begin(*args):
            state = real_begin(*args)
            state_job[id(state)] = next(i for i, j in enumerate(self.jobs)
                                        if j.slot is not None and j.slot.cache is state.cache)
            return state

        monkeypatch.setattr(scheduler, "prefill_chunk", spy_chunk)
        monkeypatch.setattr(scheduler, "decode_step_batch", spy_step)
        monkeypatch.setattr(scheduler, "begin", spy_begin)
        self.tokenizer = tokenizer

    def submit(self, prompt: list[int], method: str, max_new: int, params: SamplingParams | None = None) -> Job:
        i = len(self.jobs)
        self.events[i], self.done[i] = [], threading.Event()

        def on_event(event: Event, i=i) -> None:
            self.events[i].append(event)
            if event.kind != "text":
                self.done[i].set()

        job = Job(Request("a", prompt, params or SamplingParams(), max_new, method), on_event, TextStream(self.tokenizer, ()))
        self.jobs.append(job)
        return self.server.scheduler.submit(job)

    def run(self) -> None:
        self.server.scheduler.start()
        try:
            for i, done in self.done.items():
                assert done.wait(120), f"job {i} did not end"
        finally:
            self.server.scheduler.stop()
        assert all(not slot.busy for slot in self.server.pools["a"].slots)  # every slot freed
        assert self.server.scheduler.active == 0

    def end(self, i: int) -> Event:
        return self.events[i][-1]

    def prefills(self, i: int) -> list[int]:
        return [n for kind, *rest in self.log if kind == "prefill" and rest[0] == i for n in rest[1:]]

    def steps_between_prefills(self, i: int) -> int:
        """Decode steps run while job ``i`` was being prefilled (between its first and last chunk)."""
        at = [k for k, (kind, *rest) in enumerate(self.log) if kind == "prefill" and rest[0] == i]
        return sum(1 for kind, *_ in self.log[at[0]:at[-1]] if kind == "step")


SHORT = [([5, 6, 7, 8, 5, 6], "s2d"), ([40, 41, 42], "sd-exit-1"), ([9, 8, 7, 9, 8, 7, 9], "ar")]


def test_a_long_prompt_is_prefilled_between_the_others_steps(family, monkeypatch):
    """A 300-token prompt with chunks of 16 beside three short requests: the short ones decode while it is
    prefilled (a decode step between every two of its chunks), every chunk holds at most 16 tokens, and every
    output equals the request decoded alone (whole prefill)."""
    run = Run(family, 16, monkeypatch)
    run.submit(LONG, "s2d", 12)
    for prompt, method in SHORT:
        run.submit(prompt, method, 40)
    run.run()
    assert all(run.end(i).kind == "done" for i in range(4))
    chunks = run.prefills(0)
    assert sum(chunks) == len(LONG) - 1 and max(chunks) <= 16 and len(chunks) >= 19
    # between two chunks of the long prompt, one decode step of the short ones: nobody waits for two chunks
    at = [k for k, (kind, *rest) in enumerate(run.log) if kind == "prefill" and rest[0] == 0]
    for a, b in itertools.pairwise(at):
        between = [entry for entry in run.log[a + 1:b] if entry[0] == "step"]
        assert len(between) == 1 and 0 not in between[0][1]
    assert run.steps_between_prefills(0) >= 18
    expected = [alone(family, LONG, "s2d", 12)] + [alone(family, p, m, 40) for p, m in SHORT]
    assert [job.state.output for job in run.jobs] == expected


def test_short_prompts_go_first_and_a_long_one_is_cut_as_alone(family, monkeypatch):
    """The chunk of a step goes to the shortest remaining prompts first: short requests admitted beside a
    long one are in (and decoding) in the first step. The long one is cut at multiples of the chunk from its
    start, as it would be alone: it waits for a step with room for a whole chunk rather than taking what the
    short ones left (where cuts fall changes a bf16 cache's bits, and so could change its output)."""
    run = Run(family, 32, monkeypatch)
    run.submit(LONG, "ar", 4)
    for prompt, method in SHORT:
        run.submit(prompt, method, 6)
    run.run()
    first_step = next(k for k, entry in enumerate(run.log) if entry[0] == "step")
    assert {i for kind, *rest in run.log[:first_step] if kind == "prefill" for i in rest[:1]} == {1, 2, 3}
    assert sorted(run.log[first_step][1]) == [1, 2, 3]
    whole, rest = divmod(len(LONG) - 1, 32)
    assert run.prefills(0) == [32] * whole + ([rest] if rest else [])
    alone_run = Run(family, 32, monkeypatch)
    alone_run.submit(LONG, "ar", 4)
    alone_run.run()
    assert alone_run.prefills(0) == run.prefills(0)
    assert [job.state.output for job in run.jobs] == [alone(family, LONG, "ar", 4)] + [
        alone(family, p, m, 6) for p, m in SHORT]


# --- the prompt cache: a slot's cache keeps the prefix a new prompt shares with the last one ---------------------

def test_reusable_prefix_rules(family, checkpoints):
    from s2d.decode import reusable_prefix

    target = family[1]["a"]  # float32: prefills of more than 64 rows run on torch, whose bits depend on the cuts
    cached = LONG[:200] + [3, 3, 3]
    assert reusable_prefix(target, cached, LONG, 16) == 192  # ends on a cut a whole prefill makes too
    assert reusable_prefix(target, cached, LONG[:100], 16) == 96  # short of the prompt's last two tokens
    assert reusable_prefix(target, [9] + LONG, LONG, 16) == 0
    bf16 = load_model(checkpoints["target"], dtype="bfloat16")
    if native.library() is None or not bf16.native_runtime().prefill_rows:
        pytest.skip("the runtime does not prefill here")
    # prefilled on the runtime, every row is the bits of a one-token pass: any prefix is exact
    assert reusable_prefix(bf16, cached, LONG, 16) == 200
    assert reusable_prefix(bf16, LONG, LONG[:50], 16) == 48


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_slot_keeps_the_prefix_its_last_request_left(checkpoints, sorted_draft_dir, monkeypatch, dtype):
    """One slot, three requests in turn: the second shares 200 tokens with the first, the third is the first
    again. Each prefills only what its slot's cache did not hold, and each output equals the request decoded
    alone (a whole prefill): in float32 the kept part ends on a multiple of the chunk, in bf16 on the runtime
    anywhere."""
    family = load_family({"a": str(checkpoints["target"])}, str(sorted_draft_dir), dtype, "cpu")
    runtime_prefill = dtype == "bfloat16" and native.library() is not None \
        and family[1]["a"].native_runtime().prefill_rows > 0
    if dtype == "bfloat16" and not runtime_prefill:
        pytest.skip("bf16 outputs are compared where the runtime prefills")
    other = LONG[:200] + [7, 8, 9] * 20
    run = Run(family, 16, monkeypatch, max_slots=1)
    for prompt in (LONG, other, LONG):
        run.submit(prompt, "s2d", 12)
    run.run()
    kept = [200, 200] if runtime_prefill else [192, 192]
    assert run.server.scheduler.reused_prompt_tokens == sum(kept)
    assert [sum(run.prefills(i)) for i in range(3)] == [len(LONG) - 1, len(other) - 1 - kept[0],
                                                        len(LONG) - 1 - kept[1]]
    assert [job.state.output for job in run.jobs] == [alone(family, p, "s2d", 12) for p in (LONG, other, LONG)]


def test_a_failed_request_leaves_nothing_to_reuse(family, monkeypatch):
    run = Run(family, 16, monkeypatch, fail_prefill=lambda run, job: job == 0 and len(run.prefills(0)) == 4,
              max_slots=1)
    run.submit(LONG, "ar", 4)
    run.submit(LONG, "ar", 4)
    run.run()
    assert run.end(0).kind == "error" and run.end(1).kind == "done"
    assert run.server.scheduler.reused_prompt_tokens == 0 and sum(run.prefills(1)) == len(LONG) - 1
    assert run.jobs[1].state.output == alone(family, LONG, "ar", 4)


def test_a_request_cancelled_mid_prefill_frees_its_slot(family, monkeypatch):
    def cancel_after_three(run: Run, job: int) -> None:
        if job == 0 and len(run.prefills(0)) == 3:
            run.jobs[0].cancel()  # what a client that went away does (the HTTP layer calls cancel)

    run = Run(family, 16, monkeypatch, on_prefill=cancel_after_three)
    run.submit(LONG, "s2d", 12)
    for prompt, method in SHORT:
        run.submit(prompt, method, 30)
    run.run()
    assert run.end(0).finish_reason == "cancelled" and len(run.prefills(0)) == 3
    assert run.server.scheduler.cancelled == 1
    assert [job.state.output for job in run.jobs[1:]] == [alone(family, p, m, 30) for p, m in SHORT]


def test_a_failed_prefill_ends_only_its_request(family, monkeypatch):
    run = Run(family, 16, monkeypatch, fail_prefill=lambda run, job: job == 0 and len(run.prefills(0)) == 4)
    run.submit(LONG, "s2d", 12)
    for prompt, method in SHORT:
        run.submit(prompt, method, 30)
    too_long = run.submit(LONG, "ar", 400)  # prompt + max_tokens beyond the context: refused when begun
    run.run()
    assert run.end(0).kind == "error" and "prefill pass failed" in str(run.end(0).error)
    assert run.end(4).kind == "error" and "context" in str(run.end(4).error) and too_long.state is None
    assert [job.state.output for job in run.jobs[1:4]] == [alone(family, p, m, 30) for p, m in SHORT]
    # the freed slots serve again: the same long request, now alone, gives its output
    run2 = Run(family, 16, monkeypatch)
    run2.submit(LONG, "s2d", 12)
    run2.run()
    assert run2.jobs[0].state.output == alone(family, LONG, "s2d", 12)


def test_the_live_server_with_a_small_chunk(family):
    """Through HTTP: a long prompt with --prefill-chunk 8, concurrent with short requests, streamed or not;
    each text equals the request alone."""
    from concurrent.futures import ThreadPoolExecutor

    from servetools import LiveServer, reference

    tokenizer, models, draft = family
    long_text = "def parse(line):\n    return line.split(',')\n" * 7
    asks = [(long_text, "s2d"), ("import os", "sd-exit-2"), ("x = [1, 2, 1, 2", "lookup"), ("while", "ar")]
    expected = [reference(family, "a", text, 16, method) for text, method in asks]
    live = LiveServer(Server(tokenizer, models, draft, ServerConfig(max_slots=4, prefill_chunk=8)))
    try:
        def ask(i: int) -> str:
            text, method = asks[i]
            client = live.client()
            extra = {"extra_body": {"method": method}, "temperature": 0}
            if i % 2:
                chunks = client.completions.create(model="a", prompt=text, max_tokens=16, stream=True, **extra)
                return "".join(c.choices[0].text for c in chunks)
            return client.completions.create(model="a", prompt=text, max_tokens=16, **extra).choices[0].text

        with ThreadPoolExecutor(len(asks)) as pool:
            got = list(pool.map(ask, range(len(asks))))
    finally:
        live.stop()
    assert got == expected
    assert all(not slot.busy for slot in live.server.pools["a"].slots)


def test_the_server_cuts_prompts_where_prefill_does():
    """generate, batches and the server cut a prompt at the same places (bf16 caches depend on the cuts)."""
    from s2d.decode import PREFILL_CHUNK
    from s2d.serve import DEFAULT_PREFILL_CHUNK

    assert DEFAULT_PREFILL_CHUNK == PREFILL_CHUNK
