"""One Engine used from several threads refuses rather than mixes sequences (issue 28, class 3), and float16
speculative decoding is not stopped by a false non-finite alarm (class 4)."""

from __future__ import annotations

import threading

import pytest
import torch

from s2d.drafting import build_drafter, default_options, engine_draft_tokens
from s2d.engine import Engine, EngineBusyError
from s2d.model.loading import load_model
from s2d.sampling import SamplingParams, check_finite_logits

PROMPT = list(range(40, 70))


@pytest.fixture(scope="module")
def target(checkpoints):
    return load_model(checkpoints["target"], dtype="float32")


def test_generate_in_another_thread_refuses_while_a_started_sequence_is_unfinished(target):
    plain = Engine(target, eos_token_ids=()).generate(PROMPT, SamplingParams(), 12).output
    engine = Engine(target, eos_token_ids=())
    state = engine.start(PROMPT, SamplingParams(), 12)
    engine.step(state)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            engine.generate([5, 6, 7], SamplingParams(), 8)
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            errors.append(err)

    worker = threading.Thread(target=other)
    worker.start()
    worker.join()
    assert len(errors) == 1 and isinstance(errors[0], EngineBusyError)
    assert "start()" in str(errors[0])
    while not state.finished:  # the first sequence goes on, untouched
        engine.step(state)
    assert state.output == plain
    assert engine.generate(PROMPT, SamplingParams(), 12).output == plain  # free again once it finished


def test_start_and_step_refuse_during_another_threads_stream(target):
    plain = Engine(target, eos_token_ids=()).generate(PROMPT, SamplingParams(), 10).output
    engine = Engine(target, eos_token_ids=())
    stream = engine.stream(PROMPT, SamplingParams(), 10)
    first = next(stream)
    with pytest.raises(EngineBusyError, match="stream"):
        engine.start([1, 2, 3], SamplingParams(), 4)
    with pytest.raises(EngineBusyError):
        next(engine.stream([1, 2, 3], SamplingParams(), 4))
    assert first + [t for step in stream for t in step] == plain


def test_concurrent_entry_points_never_return_wrong_tokens(target):
    """Two threads hammer one Engine through start/step and generate: every call either finishes with the
    tokens the sequence decodes alone or is refused with EngineBusyError."""
    prompts = [list(range(30, 50)), list(range(60, 75))]
    expected = [Engine(target, eos_token_ids=()).generate(p, SamplingParams(), 10).output for p in prompts]
    engine = Engine(target, eos_token_ids=())
    wrong: list[str] = []
    done = {"steps": 0, "generates": 0}

    def stepper() -> None:
        for _ in range(6):
            try:
                state = engine.start(prompts[0], SamplingParams(), 10)
                while not state.finished:
                    engine.step(state)
            except EngineBusyError:
                continue
            done["steps"] += 1
            if state.output != expected[0]:
                wrong.append(f"start/step gave {state.output}")

    def generator() -> None:
        for _ in range(6):
            try:
                out = engine.generate(prompts[1], SamplingParams(), 10).output
            except EngineBusyError:
                continue
            done["generates"] += 1
            if out != expected[1]:
                wrong.append(f"generate gave {out}")

    threads = [threading.Thread(target=stepper), threading.Thread(target=generator)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not wrong
    assert done["steps"] + done["generates"] > 0


def test_float16_logits_are_summed_without_overflow():
    big = torch.full((6, 257), 300.0, dtype=torch.float16)  # finite; their float16 sum would be inf
    check_finite_logits(big, "target")
    with pytest.raises(Exception, match="NaN or inf"):
        check_finite_logits(torch.tensor([[1.0, float("nan")]], dtype=torch.float16), "target")


@pytest.mark.parametrize("method", ["sd", "lookup+sd", "pld"])
def test_float16_speculative_equals_float16_plain(checkpoints, method):
    """The torch path in float16 (CUDA users' dtype): every speculative method equals plain decoding."""
    target = load_model(checkpoints["target"], dtype="float16")
    draft = load_model(checkpoints["draft"], dtype="float16")
    with torch.no_grad():  # a shared direction in every head row: logits of one sign in the hundreds, so the
        #                     float16 sum of a 2+ row block overflows (the false alarm this guards against)
        shared = torch.randn(target.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
        target.lm_head.weight.add_(100.0 * shared.to(torch.float16)[None])
    plain = Engine(target, eos_token_ids=()).generate(PROMPT, SamplingParams(), 24).output
    options = default_options(method, draft)
    drafter = build_drafter(method, draft, options, target)
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=3)):
        state = Engine(target, drafter, engine_draft_tokens(method, options), eos_token_ids=()).generate(
            PROMPT, params, 24)
        if params.greedy:
            assert state.output == plain
        assert len(state.output) == 24
