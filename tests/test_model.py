"""The runtime against transformers' own forward, in float32."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from s2d.model.config import ModelConfig
from s2d.model.loading import load_model
from s2d.model.tiny import write_random_checkpoint

ARCH_CASES = {
    "llama-gqa-tied": dict(arch="llama", tie_word_embeddings=True),
    "llama-bias-llama3-rope": dict(arch="llama", attention_bias=True, mlp_bias=True, num_kv_heads=4,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64}),
    "llama-linear-rope": dict(arch="llama", rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                             "factor": 2.0}),
    "mistral": dict(arch="mistral", sliding_window=None),
    "qwen2-qkv-bias": dict(arch="qwen2", num_kv_heads=1),
}


def hf_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module", params=sorted(ARCH_CASES))
def checkpoint(request, tmp_path_factory):
    kwargs = dict(ARCH_CASES[request.param])
    return write_random_checkpoint(tmp_path_factory.mktemp(request.param), seed=3, **kwargs)


def test_logits_match_transformers(checkpoint):
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    model = load_model(checkpoint, dtype="float32")
    ours = model(ids, torch.arange(40), model.new_cache(batch=2))
    torch.testing.assert_close(ours, hf_logits(checkpoint, ids), atol=2e-5, rtol=1e-4)


def test_incremental_decoding_equals_full_forward(checkpoint):
    ids = torch.randint(0, 257, (1, 30), generator=torch.Generator().manual_seed(1))
    model = load_model(checkpoint, dtype="float32")
    full = model(ids, torch.arange(30), model.new_cache())
    cache = model.new_cache()
    model(ids[:, :10], torch.arange(10), cache, logits_at=None)
    pieces = [model(ids[:, 10:13], torch.arange(10, 13), cache)]  # a block of three
    pieces += [model(ids[:, i:i + 1], torch.arange(i, i + 1), cache) for i in range(13, 30)]
    torch.testing.assert_close(torch.cat(pieces, 1), full[:, 10:], atol=2e-5, rtol=1e-4)


def test_layer_ranges_compose_and_logits_only_where_asked(checkpoints):
    model = load_model(checkpoints["target"], dtype="float32")
    ids = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(2))
    full = model(ids, torch.arange(12), model.new_cache())
    cache = model.new_cache()
    h = model.run_layers(model.embed_tokens(ids), torch.arange(12), cache, 0, 1)
    assert cache.lengths == [12, 0, 0]
    h = model.run_layers(h, torch.arange(12), cache, 1, 3)
    torch.testing.assert_close(model.logits(h), full)
    picked = model(ids, torch.arange(12), model.new_cache(), logits_at=torch.tensor([3, 7]))
    torch.testing.assert_close(picked, full[:, [3, 7]])


def test_rollback_is_a_length_change(checkpoints):
    model = load_model(checkpoints["target"], dtype="float32")
    ids = torch.randint(0, 257, (1, 20), generator=torch.Generator().manual_seed(3))
    full = model(ids, torch.arange(20), model.new_cache())
    cache = model.new_cache()
    model(ids[:, :15], torch.arange(15), cache, logits_at=None)
    model(torch.randint(0, 257, (1, 4)), torch.arange(15, 19), cache, logits_at=None)  # rejected tokens
    cache.truncate(15)
    torch.testing.assert_close(model(ids[:, 15:], torch.arange(15, 20), cache), full[:, 15:])


def test_tree_mask_and_compaction(checkpoints):
    """Two branches verified in one pass with a tree mask; compacting one branch equals decoding it alone."""
    model = load_model(checkpoints["target"], dtype="float32")
    g = torch.Generator().manual_seed(4)
    prefix, a, b = (torch.randint(0, 257, (1, n), generator=g) for n in (10, 3, 2))
    cache = model.new_cache()
    model(prefix, torch.arange(10), cache, logits_at=None)
    # Block layout: [a0 a1 a2 b0 b1]; b is a sibling branch starting at position 10.
    block = torch.cat([a, b], 1)
    positions = torch.tensor([10, 11, 12, 10, 11])
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[:3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()
    mask[3:, 3:] = torch.ones(2, 2, dtype=torch.bool).tril()
    tree = model(block, positions, cache, block_mask=mask)
    alone_b = model(torch.cat([prefix, b], 1), torch.arange(12), model.new_cache())[:, 10:]
    alone_a = model(torch.cat([prefix, a], 1), torch.arange(13), model.new_cache())[:, 10:]
    torch.testing.assert_close(tree[:, 3:], alone_b)
    torch.testing.assert_close(tree[:, :3], alone_a)
    cache.compact(10, torch.tensor([13, 14]))  # keep branch b
    nxt = torch.randint(0, 257, (1, 1), generator=g)
    after = model(nxt, torch.tensor([12]), cache)
    ref = model(torch.cat([prefix, b, nxt], 1), torch.arange(13), model.new_cache())[:, -1:]
    torch.testing.assert_close(after, ref)


def test_transformers_4x_config_keys_load(tmp_path, checkpoints):
    """rope_theta / rope_scaling / torch_dtype (4.x) parse like rope_parameters / dtype (5.x)."""
    raw = json.loads((checkpoints["target"] / "config.json").read_text())
    old = {k: v for k, v in raw.items() if k not in ("rope_parameters", "dtype")}
    old.update(rope_theta=50000.0, torch_dtype="bfloat16",
               rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64})
    new = dict(raw, rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}, dtype="bfloat16")
    a, b = ModelConfig.from_dict(old), ModelConfig.from_dict(new)
    assert a == b
    assert a.rope_theta == 50000.0 and a.rope_scaling["rope_type"] == "llama3" and a.dtype == "bfloat16"


def test_sharded_checkpoint_loads(tmp_path, checkpoints):
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["target"], dtype=torch.float32)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 257, (1, 8))
    ours = load_model(tmp_path, dtype="float32")
    ref = load_model(checkpoints["target"], dtype="float32")
    torch.testing.assert_close(ours(ids, torch.arange(8), ours.new_cache()), ref(ids, torch.arange(8), ref.new_cache()))


def test_bfloat16_close_to_float32(checkpoints):
    ids = torch.randint(0, 257, (1, 16))
    m32 = load_model(checkpoints["target"], dtype="float32")
    m16 = load_model(checkpoints["target"], dtype="bfloat16")
    assert m16.dtype == torch.bfloat16
    a = m32(ids, torch.arange(16), m32.new_cache())
    b = m16(ids, torch.arange(16), m16.new_cache()).float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_truncated_load_keeps_first_layers(checkpoints):
    full = load_model(checkpoints["target"], dtype="float32")
    two = load_model(checkpoints["target"], dtype="float32", num_layers=2)
    ids = torch.randint(0, 257, (1, 6))
    h = full.run_layers(full.embed_tokens(ids), torch.arange(6), full.new_cache(), 0, 2)
    torch.testing.assert_close(two(ids, torch.arange(6), two.new_cache()), full.logits(h))


@pytest.mark.parametrize("rows", [8, 17, 37])
def test_bf16_upcast_agrees_with_plain_bf16(monkeypatch, rows):
    """Long bf16 blocks on CPUs without native bf16 upcast the weight: the same products as plain bf16."""
    from s2d.model import llama

    layer = torch.nn.Linear(64, 96, bias=True).to(torch.bfloat16)
    x = torch.randn(1, rows, 64, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    with torch.inference_mode():
        monkeypatch.setattr(llama, "CPU_BF16_UPCAST", False)
        plain = llama.linear(layer, x)
        monkeypatch.setattr(llama, "CPU_BF16_UPCAST", True)
        fast = llama.linear(layer, x)
    assert fast.dtype == torch.bfloat16 and fast.shape == plain.shape
    # Same exact products; only the float32 summation order may differ: at most one bf16 ulp.
    torch.testing.assert_close(fast.float(), plain.float(), atol=1e-6, rtol=2 ** -7)


def test_cache_memory_is_taken_where_written():
    """A CPU cache reads as zeros everywhere (kernels may read past a sequence's length, weighted 0) and takes
    memory only where it is written: a server's slots cost what their sequences fill, not the whole context."""
    from s2d.model.cache import KVCache

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    before = resident()
    cache = KVCache(4, 1, 8, 4096, 128, torch.bfloat16, "cpu")  # 2 x 32 MiB
    cache.k[2, 0, 3, 100] = 1.5
    assert resident() - before < 8 << 20  # one page written
    assert cache.k.is_contiguous() and cache.k.shape == (4, 1, 8, 4096, 128) and cache.k.dtype == torch.bfloat16
    assert cache.k[2, 0, 3, 100].eq(1.5).all() and cache.k.count_nonzero() == 128 and not cache.v.any()


def test_a_copied_cache_reads_and_writes_its_own_tensors():
    """The addresses the native runtime reads a cache at are computed once (``native_layout``); a deep copy
    holds new tensors, so its layout must be its own (a copied one made a pass on the copy write the original)."""
    import copy

    from s2d.model.cache import KVCache

    cache = KVCache(2, 1, 2, 16, 8, torch.float32, "cpu")
    layout = cache.native_layout
    twin = copy.deepcopy(cache)
    assert twin.native_layout[:2] == (twin.k.data_ptr(), twin.v.data_ptr())
    assert twin.native_layout[2:] == layout[2:] and cache.native_layout == layout
    assert copy.copy(cache).native_layout == layout  # a shallow copy shares the tensors
