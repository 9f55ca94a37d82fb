"""The CUDA path: every method lossless on a GPU, batched decoding equal to each sequence alone, the sampler's
law kept. Skipped where torch sees no CUDA device (CI never has one; a session lent a GPU runs this module).

On a GPU a block's logits can differ in their last bits from one-row passes (cuBLAS picks kernels by shape), so
the exact comparisons run in float32, where such differences are far below the random models' logit gaps."""

from __future__ import annotations

import pytest
import torch
from stats import chi2_critical, exact_two_tokens, lumped_chi2
from tinymodels import small_vocab_model

from s2d.drafting import SortedConfig, SortedDrafter
from s2d.engine import Engine, MultiTargetEngine
from s2d.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

PROMPTS = [list(range(40, 70)), [7, 3, 9, 7, 3, 1, 12, 40, 41, 42] * 3, list(range(1, 200)) + list(range(5, 70)),
           [99, 98, 97]]
MAX_NEW = [30, 24, 12, 40]
METHODS = ["ar", "sd-exit-1", "sd-exit-3", "lookup", "s2d", "s2d-tree", "rsd", "lookup+rsd", "s2d-softmax", "sd", "overlap+sd-exit-2", "rsd-sbs"]


@pytest.fixture(scope="module")
def family(checkpoints, sorted_draft_dir):
    from s2d.model.loading import load_model

    return load_model(checkpoints["target"], dtype="float32", device="cuda"), \
        load_model(sorted_draft_dir, dtype="float32", device="cuda")


@pytest.fixture(scope="module")
def plain_outputs(family):
    target, _ = family
    engine = MultiTargetEngine({"t": target}, None, "ar", eos_token_ids=())
    return [engine.generate("t", p, SamplingParams(), n).output for p, n in zip(PROMPTS, MAX_NEW)]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_cuda_gives_the_targets_greedy_output(family, plain_outputs, method):
    target, draft = family
    engine = MultiTargetEngine({"t": target}, draft, method, eos_token_ids=())
    got = [engine.generate("t", p, SamplingParams(), n).output for p, n in zip(PROMPTS, MAX_NEW)]
    assert got == plain_outputs


@pytest.mark.parametrize("method", ["ar", "sd-exit-1", "lookup", "s2d", "s2d-tree", "rsd"])
def test_a_batch_on_cuda_equals_each_sequence_alone(family, plain_outputs, method):
    target, draft = family
    engine = MultiTargetEngine({"t": target}, draft, method, eos_token_ids=())
    assert [s.output for s in engine.generate_batch("t", PROMPTS, SamplingParams(), MAX_NEW)] == plain_outputs


def test_the_cuda_model_agrees_with_the_cpu_reference(checkpoints):
    """One forward pass over a prompt: the GPU's logits are the CPU reference's, to float32 rounding."""
    from s2d.model.loading import load_model

    cpu = load_model(checkpoints["target"], dtype="float32")
    gpu = load_model(checkpoints["target"], dtype="float32", device="cuda")
    ids = torch.tensor([PROMPTS[2]])
    positions = torch.arange(ids.shape[1])
    with torch.no_grad():
        want = cpu(ids, positions, cpu.new_cache())
        got = gpu(ids.cuda(), positions.cuda(), gpu.new_cache())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["sd-exit-2", "s2d", "rsd"])
def test_seeded_sampling_on_cuda_in_a_batch_equals_the_same_request_alone(family, method):
    target, draft = family
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=i) for i in range(len(PROMPTS))]
    # a fresh engine for each: s2d's adaptive state learns from what it decoded, and a draft length changes
    # which random numbers a sampled step draws
    alone = [MultiTargetEngine({"t": target}, draft, method, eos_token_ids=()).generate("t", p, q, n).output
             for p, q, n in zip(PROMPTS, params, MAX_NEW)]
    engine = MultiTargetEngine({"t": target}, draft, method, eos_token_ids=())
    assert [s.output for s in engine.generate_batch("t", PROMPTS, params, MAX_NEW)] == alone


def test_the_sampler_on_cuda_keeps_the_targets_distribution():
    """Two sampled tokens from 64-sequence batches on the GPU follow the target's exact law (chi-squared at
    p=0.001); the exact law is enumerated on the CPU copy of the same weights."""
    target_cpu = small_vocab_model(2, seed=1)
    _, exact = exact_two_tokens(target_cpu, [1, 2, 3])
    target = small_vocab_model(2, seed=1).to("cuda")
    draft = small_vocab_model(3, seed=2, exits=(1, 2, 3)).to("cuda")
    drafters = [SortedDrafter(draft, SortedConfig((1, 2, 3), (0.85, 0.9, 0.0))) for _ in range(64)]
    engine = Engine(target, drafters[0], 3, eos_token_ids=())
    counts = torch.zeros(64)
    for batch in range(30):
        params = [SamplingParams(temperature=1.0, seed=64 * batch + i) for i in range(64)]
        for state in engine.generate_batch([[1, 2, 3]] * 64, params, 2, drafters):
            counts[state.output[0] * 8 + state.output[1]] += 1
    stat, df = lumped_chi2(counts, exact * counts.sum())
    assert stat < chi2_critical(df), (stat, chi2_critical(df))
