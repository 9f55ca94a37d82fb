"""Issue 17, the Python API (the Engine and sampling): non-finite numbers are refused, prompts must be token
ids, drafts must share the target's vocabulary, and one engine decodes one sequence at a time."""

from __future__ import annotations

import pytest
import torch

from s2d.drafting.model import ModelDrafter
from s2d.engine import Engine, EngineBusyError, InputError
from s2d.model.config import CheckpointError
from s2d.model.loading import load_model
from s2d.model.tiny import write_random_checkpoint
from s2d.sampling import SamplingParams, probabilities


def test_engine_refuses_nan_logits(checkpoints):
    # One bad value the load-time sample could miss: it spreads to every logit, and the pass's check sees it.
    target = load_model(checkpoints["target"], dtype="float32")
    with torch.no_grad():
        target.layers[0].down.weight[3, 5] = float("nan")
    target.drop_native()
    with pytest.raises(CheckpointError, match="NaN or inf logits"):
        Engine(target, eos_token_ids=()).generate([1, 2, 3], SamplingParams(), 4)
    draft = load_model(checkpoints["target"], dtype="float32")
    with torch.no_grad():
        draft.norm.fill_(float("inf"))
    draft.drop_native()
    sane = load_model(checkpoints["target"], dtype="float32")
    with pytest.raises(CheckpointError, match="draft model computed NaN"):
        Engine(sane, ModelDrafter(draft), 3, eos_token_ids=()).generate([1, 2, 3], SamplingParams(1.0, seed=0), 4)

def test_tiny_temperature_is_greedy_not_nan():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.5, -1.0]])
    for t in (1e-40, 1e-50, 1e-300):
        p = probabilities(logits, SamplingParams(temperature=t))
        assert torch.isfinite(p).all()
        assert p[0].tolist() == [0.0, 1.0, 0.0] and p[1].tolist() == [0.5, 0.5, 0.0]

# ---- 7. the Python API ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(checkpoints):
    return Engine(load_model(checkpoints["target"], dtype="float32"), eos_token_ids=())


@pytest.mark.parametrize("prompt,error,message", [
    ("def f(x):", TypeError, "not text"),
    ([1, 2.5], TypeError, "integer token ids"),
    ([1, True], TypeError, "integer token ids"),
    ({"input_ids": [1, 2]}, TypeError, "not dict"),
    (torch.tensor([1.0, 2.0]), TypeError, "integer token ids"),
    (torch.tensor([[1, 2]]), InputError, "must be 1-D"),
])
def test_engine_refuses_prompts_that_are_not_token_ids(engine, prompt, error, message):
    with pytest.raises(error, match=message):
        engine.generate(prompt, SamplingParams(), 4)


def test_engine_takes_a_list_or_a_1d_tensor(engine):
    assert engine.generate(torch.tensor([5, 6, 7]), SamplingParams(), 4).output == \
        engine.generate([5, 6, 7], SamplingParams(), 4).output


def test_engine_refuses_a_draft_of_another_vocabulary(checkpoints, tmp_path, engine):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)},
                                                                                unk_token="w0")), eos_token="w0")
    other = load_model(write_random_checkpoint(tmp_path / "other", tokenizer=words, num_layers=1), dtype="float32")
    with pytest.raises(ValueError, match="draft vocab_size 300 != target vocab_size 257"):
        Engine(engine.target, ModelDrafter(other))


def test_interleaved_streams_on_one_engine_are_refused(engine):
    params = SamplingParams()
    alone = engine.generate([1, 2, 3], params, 8).output
    first = engine.stream([1, 2, 3], params, 8)
    got = list(next(first))
    second = engine.stream([9, 8, 7], params, 8)
    with pytest.raises(EngineBusyError, match="already decoding"):
        next(second)
    with pytest.raises(EngineBusyError):
        engine.generate([4], params, 2)
    for tokens in first:  # the first sequence goes on, uncorrupted
        got += tokens
    assert got == alone
    # A stream abandoned by its loop (closed) frees the engine.
    for _ in engine.stream([1, 2, 3], params, 8):
        break
    assert engine.generate([1, 2, 3], params, 8).output == alone
    # Manual start/step: a later start takes the cache over; the stale state refuses to step.
    stale = engine.start([1, 2, 3], params, 8)
    engine.start([4, 5], params, 8)
    with pytest.raises(EngineBusyError, match="no longer owns"):
        engine.step(stale)
