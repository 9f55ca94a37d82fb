from __future__ import annotations

import math

import pytest
import torch

from s2d.sampling import SamplingParams, probabilities, sample


def test_greedy_is_one_hot_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    probs = probabilities(logits, SamplingParams())
    assert probs.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_temperature_top_k_top_p():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    assert torch.allclose(probabilities(logits, SamplingParams(temperature=1.0)), logits.exp())
    top2 = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(top2, torch.tensor([2 / 3, 1 / 3, 0, 0]))
    # top_p=0.7: 0.5 alone is short of 0.7, 0.5+0.25 reaches it -> keep two tokens.
    nucleus = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.allclose(nucleus, torch.tensor([2 / 3, 1 / 3, 0, 0]))
    hot = probabilities(logits, SamplingParams(temperature=2.0))
    assert torch.allclose(hot, torch.softmax(logits / 2, -1))


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(temperature=math.nan), dict(temperature=math.inf), dict(top_p=0.0),
    dict(top_p=1.5), dict(top_k=-1), dict(top_k=2.5), dict(seed=-3),
])
def test_invalid_values_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_seeded_sampling_is_deterministic():
    probs = torch.softmax(torch.randn(50), -1).expand(20, 50)
    a = sample(probs, SamplingParams(temperature=1, seed=7).generator())
    b = sample(probs, SamplingParams(temperature=1, seed=7).generator())
    assert torch.equal(a, b)
