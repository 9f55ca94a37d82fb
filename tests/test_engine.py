"""Speculative decoding is lossless: greedy outputs equal plain greedy decoding, token for token."""

from __future__ import annotations

import pytest
import torch

from s2d.drafting.lookup import PromptLookupDrafter
from s2d.drafting.model import ModelDrafter
from s2d.engine import Engine, InputError
from s2d.model.loading import load_model
from s2d.sampling import SamplingParams

PROMPTS = [[5, 17, 99, 5, 17], list(range(40, 70)) * 2, [1]]


@pytest.fixture(scope="module")
def models(checkpoints):
    return {name: load_model(path, dtype="float32") for name, path in checkpoints.items()}


def plain(models, prompt, n=40):
    return Engine(models["target"], eos_token_ids=()).generate(prompt, SamplingParams(), n).output


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("k", [1, 4, 7])
def test_greedy_speculative_equals_plain(models, prompt, k):
    expected = plain(models, prompt)
    assert len(expected) == 40
    for drafter in (ModelDrafter(models["draft"]), ModelDrafter(models["target"]), PromptLookupDrafter()):
        state = Engine(models["target"], drafter, k, eos_token_ids=()).generate(prompt, SamplingParams(), 40)
        assert state.output == expected, type(drafter).__name__


def test_target_as_its_own_draft_accepts_everything(models):
    state = Engine(models["target"], ModelDrafter(models["target"]), 4, eos_token_ids=()).generate(
        PROMPTS[0], SamplingParams(), 40)
    assert state.stats.mean_accepted_tokens == 5.0  # 8 passes of 4 accepted + 1 bonus
    assert state.stats.accepted_at == [8, 8, 8, 8] == state.stats.proposed_at


def test_plain_decoding_counts_one_token_per_pass(models):
    state = Engine(models["target"], eos_token_ids=()).generate(PROMPTS[1], SamplingParams(), 25)
    assert state.stats.target_passes == 25 and state.stats.mean_accepted_tokens == 1.0


def test_engine_reuse_across_requests_is_clean(models):
    engine = Engine(models["target"], ModelDrafter(models["draft"]), 3, eos_token_ids=())
    first = engine.generate(PROMPTS[1], SamplingParams(), 30).output
    engine.generate(PROMPTS[0], SamplingParams(), 30)
    assert engine.generate(PROMPTS[1], SamplingParams(), 30).output == first


@pytest.mark.parametrize("drafter_name", ["draft", "lookup"])
def test_seeded_sampling_is_deterministic(models, drafter_name):
    def run(seed):
        drafter = PromptLookupDrafter() if drafter_name == "lookup" else ModelDrafter(models["draft"])
        engine = Engine(models["target"], drafter, 3, eos_token_ids=())
        return engine.generate(PROMPTS[1], SamplingParams(temperature=1.0, top_p=0.9, seed=seed), 30).output

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_stops_at_eos(models):
    out = plain(models, PROMPTS[0], 40)
    eos = out[5]
    state = Engine(models["target"], ModelDrafter(models["draft"]), 4, eos_token_ids=(eos,)).generate(
        PROMPTS[0], SamplingParams(), 40)
    assert state.output == out[: out.index(eos) + 1]


def test_max_new_tokens_is_exact(models):
    for n in (1, 2, 7):
        state = Engine(models["target"], ModelDrafter(models["target"]), 5, eos_token_ids=()).generate(
            PROMPTS[1], SamplingParams(), n)
        assert len(state.output) == n


def test_bad_requests_are_refused_and_engine_still_works(models):
    engine = Engine(models["target"], ModelDrafter(models["draft"]), 3, eos_token_ids=())
    before = engine.generate(PROMPTS[0], SamplingParams(), 10).output
    capacity = models["target"].cfg.max_positions
    with pytest.raises(InputError, match="exceeds the model's context"):
        engine.generate([1] * capacity, SamplingParams(), 10)
    with pytest.raises(InputError, match="empty"):
        engine.generate([], SamplingParams(), 10)
    with pytest.raises(InputError, match="vocabulary"):
        engine.generate([1, 100000], SamplingParams(), 10)
    with pytest.raises(InputError, match="max_new_tokens"):
        engine.generate([1], SamplingParams(), 0)
    assert engine.generate(PROMPTS[0], SamplingParams(), 10).output == before


def test_long_prompt_near_the_context_limit(models):
    capacity = models["target"].cfg.max_positions
    prompt = torch.randint(0, 256, (capacity - 8,)).tolist()
    expected = Engine(models["target"], eos_token_ids=()).generate(prompt, SamplingParams(), 8).output
    state = Engine(models["target"], ModelDrafter(models["draft"]), 5, eos_token_ids=()).generate(
        prompt, SamplingParams(), 8)
    assert state.output == expected


def test_stats_time_drafting_and_verifying_and_merge(models):
    from s2d.engine import DecodeStats

    state = Engine(models["target"], ModelDrafter(models["draft"]), 3, eos_token_ids=()).generate(
        PROMPTS[1], SamplingParams(), 20)
    s = state.stats
    assert s.draft_s > 0 and s.verify_s > 0 and s.draft_s + s.verify_s <= s.elapsed_s
    total = DecodeStats()
    total.merge(s)
    total.merge(s)
    assert total.new_tokens == 2 * s.new_tokens and total.draft_s == pytest.approx(2 * s.draft_s)
    assert total.proposed_at == [2 * v for v in s.proposed_at] and total.exit_counts == {}
