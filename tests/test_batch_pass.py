"""One target pass over the rows of several sequences (issue 26, part 1): each row attends only to its own
sequence's cache, and its result is bit-identical to the same row in a pass of its sequence alone."""

from __future__ import annotations

import copy

import pytest
import torch

from s2d.drafting.base import ancestor_mask
from s2d.model import native
from s2d.model.llama import SequenceRows
from s2d.model.loading import load_model

needs_native = pytest.mark.skipif(native.library() is None, reason="no native runtime on this machine")

# Prompt lengths that put the new rows on both sides of the attention's 256-key chunks.
PROMPTS = {"short": 7, "chunk edge": 255, "long": 300}


def prefilled(target, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.cfg.vocab_size, (length,), generator=g)
    cache = target.new_cache()
    with torch.inference_mode():
        target.run_layers(target.embed_tokens(ids[None]), torch.arange(length), cache)
    return cache


def new_rows(target, cache, n: int, seed: int, tree: bool) -> SequenceRows:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.cfg.vocab_size, (n,), generator=g)
    hidden = target.embed_tokens(ids[None])[0]
    base = cache.length
    if not tree:
        return SequenceRows(hidden, torch.arange(base, base + n), cache)
    parents = [-1] + [i // 2 for i in range(n - 1)]  # a binary tree: row 0 the root
    depths = [0]
    for p in parents[1:]:
        depths.append(depths[p] + 1)
    return SequenceRows(hidden, torch.tensor(depths) + base, cache, ancestor_mask(parents))


def alone(target, seq: SequenceRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sequence's own pass on a copy of its cache: (hidden, keys, values written)."""
    cache = copy.deepcopy(seq.cache)
    with torch.inference_mode():
        out = target.run_layers(seq.hidden[None], seq.positions, cache, block_mask=seq.block_mask)[0]
    return out, cache.k, cache.v


@needs_native
@pytest.mark.parametrize("heads", ["small", "64"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_rows_of_several_sequences_equal_each_alone(checkpoints, tiny_checkpoint, dtype, heads):
    # head size 64: the AVX512-BF16 score kernel for fixed head sizes (qk_bf16)
    path = checkpoints["target"] if heads == "small" else tiny_checkpoint(
        num_layers=2, hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=96, max_positions=1024, seed=3)
    target = load_model(path, dtype=dtype)
    seqs = []
    shapes = [(1, False), (4, False), (5, True), (3, False)]  # a decode row, a chain, a tree, a chain
    for i, ((name, length), (n, tree)) in enumerate(zip([*PROMPTS.items(), ("again", 40)], shapes)):
        seqs.append(new_rows(target, prefilled(target, length, seed=i), n, seed=100 + i, tree=tree))
    expected = [alone(target, s) for s in seqs]
    lengths = [s.cache.length for s in seqs]
    with torch.inference_mode():
        out = target.run_layers_multi(seqs)
    for s, got, (want, k, v), length in zip(seqs, out, expected, lengths):
        assert torch.equal(got, want)  # bit for bit, bf16 included
        assert torch.equal(s.cache.k, k) and torch.equal(s.cache.v, v)  # each wrote only its own cache
        assert s.cache.length == length + s.hidden.shape[0]
    # Logits too: the greedy choice of every row is the one its sequence makes alone.
    with torch.inference_mode():
        assert torch.equal(target.argmax(torch.cat(out)), target.argmax(torch.cat([e[0] for e in expected])))


@needs_native
def test_the_native_pass_agrees_with_the_torch_reference(checkpoints):
    """float32: the native batched pass and the torch path (each sequence alone) agree to rounding."""
    native_model = load_model(checkpoints["target"], dtype="float32")
    reference = load_model(checkpoints["target"], dtype="float32")
    reference.use_native = False
    out = {}
    for name, model in (("native", native_model), ("torch", reference)):
        seqs = [new_rows(model, prefilled(model, length, seed=i), n, seed=7 + i, tree=tree)
                for i, (length, n, tree) in enumerate([(20, 3, False), (270, 6, True), (3, 1, False)])]
        with torch.inference_mode():
            out[name] = model.run_layers_multi(seqs)
    for a, b in zip(out["native"], out["torch"]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@needs_native
def test_refused_inputs_change_nothing(checkpoints):
    target = load_model(checkpoints["target"], dtype="float32")
    cache = prefilled(target, target.cfg.max_positions - 2, seed=0)
    fits = new_rows(target, prefilled(target, 5, seed=1), 2, seed=2, tree=False)
    overflow = new_rows(target, cache, 4, seed=3, tree=False)
    before = (cache.k.clone(), fits.cache.k.clone(), list(cache.lengths), list(fits.cache.lengths))
    with pytest.raises(ValueError, match="cache overflow"), torch.inference_mode():
        target.run_layers_multi([fits, overflow])
    assert torch.equal(cache.k, before[0]) and torch.equal(fits.cache.k, before[1])
    assert cache.lengths == before[2] and fits.cache.lengths == before[3]
    with pytest.raises(ValueError, match="native pass takes"), torch.inference_mode():
        native.NativeRuntime.create(target).run_layers_multi(
            torch.zeros(native.MAX_ROWS + 1, target.cfg.hidden_size), torch.zeros(native.MAX_ROWS + 1),
            [fits.cache], [native.MAX_ROWS + 1], [0], [None], 0, 1)
