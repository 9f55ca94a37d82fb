"""The native CPU runtime against the torch reference path: products, passes, decoding, invariances."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from s2d.drafting import DraftOptions, build_drafter
from s2d.engine import Engine, InputError
from s2d.model import native
from s2d.model.config import CheckpointError
from s2d.model.loading import load_model
from s2d.model.tiny import write_random_checkpoint
from s2d.sampling import SamplingParams

pytestmark = pytest.mark.skipif(native.library() is None, reason="the native runtime does not run on this machine")

# Every instruction set this CPU can run: the AVX2 code is tested on AVX512 machines too.
LEVELS = [lvl for lvl in (1, 2, 3) if native.library() is not None and native.library().s2d_isa() >= lvl]
ISA_ENV = {1: "avx2", 2: "avx512", 3: "amx"}


@pytest.fixture(params=LEVELS, ids=lambda lvl: ISA_ENV[lvl])
def isa(request, monkeypatch):
    monkeypatch.setenv("S2D_NATIVE_ISA", ISA_ENV[request.param])
    return request.param


@pytest.fixture(scope="module")
def family(tmp_path_factory, sorted_draft_dir):
    """Tiny checkpoints with what the runtime must handle: GQA, qkv bias, odd sizes, a sorted draft."""
    root = tmp_path_factory.mktemp("native")
    return {
        # head size 32: P.V on AMX tiles (head sizes that are multiples of 32 but neither 64 nor 128) is exercised too
        "gqa": write_random_checkpoint(root / "gqa", num_layers=3, hidden_size=128, num_heads=4, num_kv_heads=2,
                                       intermediate_size=200, seed=11),
        # K and N not multiples of any vector width; Qwen2 adds q/k/v biases
        "qwen": write_random_checkpoint(root / "qwen", "qwen2", num_layers=2, hidden_size=52, num_heads=2,
                                        num_kv_heads=1, intermediate_size=74, seed=12),
        # contexts past one attention chunk (256 keys)
        "long": write_random_checkpoint(root / "long", num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=2,
                                        intermediate_size=96, max_positions=1024, seed=13),
        # head sizes 64 and 128: AVX512-BF16 scores them with the fixed-D kernels (qk_bf16), 16 keys at a time
        "head64": write_random_checkpoint(root / "head64", num_layers=2, hidden_size=128, num_heads=2, num_kv_heads=1,
                                          intermediate_size=96, max_positions=1024, seed=14),
        "head128": write_random_checkpoint(root / "head128", num_layers=2, hidden_size=256, num_heads=2,
                                           num_kv_heads=2, intermediate_size=96, max_positions=1024, seed=15),
        "draft": sorted_draft_dir,
    }


def reference(model):
    ref = copy.deepcopy(model)
    ref.use_native = False
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# m > 16: rows in groups of 16 on AMX tiles, the last one padded (17, 40) or full (64)
# packed (AVX512-BF16, bf16): 12 rows a call, remainders 1-11 (13, 25), odd K (43, 577, 9), panels of 32 outputs;
# rows 2 or 4 KB apart (K 1024, 2048) are copied to a longer stride first
# packed (AVX2): from 4 rows, half panels of 16 outputs in groups of 4-6 rows as even as they come (4, 5, 6, 9,
# 13, 16, 19, 64), but 7 rows as 5 on half panels and 2 on the whole panel; 1-3 rows in whole panels; a half
# with a few valid outputs or none (19 x 20, 24 x 40)
@pytest.mark.parametrize("m,n,k", [(1, 96, 64), (3, 37, 43), (6, 130, 576), (16, 7, 9), (5, 64, 2050),
                                   (17, 150, 96), (40, 80, 64), (64, 33, 128), (12, 64, 576), (13, 70, 577),
                                   (25, 31, 34), (9, 40, 1024), (30, 64, 2048), (24, 40, 577), (19, 20, 33),
                                   (23, 48, 96), (7, 64, 95), (4, 40, 33)])
@pytest.mark.parametrize("packed", [None, False], ids=["as-passes", "row-major"])
def test_product_matches_reference_and_is_row_independent(isa, dtype, m, n, k, packed):
    if packed is False and not (dtype == torch.bfloat16 and isa in (1, 2, 3)):
        pytest.skip("the row-major product is what passes use here already")
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    linear = functools.partial(native.linear, packed=packed)
    got = linear(x, w, isa)
    ref = x.float() @ w.float().T  # the exact products, summed in float32
    torch.testing.assert_close(got, ref, atol=1e-4 * k ** 0.5, rtol=1e-5)
    # A row's result does not depend on how many rows share the call, nor on the thread count.
    for i in range(m):
        assert torch.equal(linear(x[i:i + 1], w, isa)[0], got[i])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(linear(x, w, isa), got)
    finally:
        torch.set_num_threads(threads)


def in_fresh_process(code: str, **env: str) -> str:
    """What ``code`` prints (stripped) in a new Python with ``native`` imported and ``env`` added: the runtime's
    defaults are read once per process."""
    run = subprocess.run([sys.executable, "-c", "from s2d.model import native; " + code],
                         env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return run.stdout.strip()


@pytest.fixture
def wide_default():
    """Restores whether the AVX2 level's products run on 512-bit vectors (a process-wide value)."""
    before = native.wide_products()
    yield before
    native.wide_products(before)


def cpuinfo(field: str) -> str:
    """The first CPU's ``field`` in /proc/cpuinfo ('' where absent)."""
    with open("/proc/cpuinfo") as info:
        return next((line.split(":", 1)[1].strip() for line in info if line.split(":")[0].strip() == field), "")


def has_avx512() -> bool:
    flags = cpuinfo("flags").split()
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))


@pytest.fixture
def prefetch_default():
    """Restores the runtime's prefetch setting (a process-wide value) after a test that changes it."""
    before = native.prefetch_rows()
    yield before
    native.prefetch_rows(before)


def test_products_are_the_same_bits_whatever_rows_prefetch(isa, prefetch_default):
    """Which calls prefetch ahead (from 1 row on Intel, 4 elsewhere) changes hints only: every row count gives
    the same bits with prefetches from one row on and with none below 64 rows."""
    g = torch.Generator().manual_seed(7)
    for m, n, k in ((1, 96, 576), (2, 70, 577), (3, 64, 64), (4, 40, 96), (6, 130, 576), (7, 64, 95), (16, 33, 128)):
        x = torch.randn(m, k, generator=g).bfloat16()
        w = torch.randn(n, k, generator=g).bfloat16()
        native.prefetch_rows(1)
        eager = native.linear(x, w, isa)
        native.prefetch_rows(64)
        assert torch.equal(native.linear(x, w, isa), eager), (m, n, k)


def test_prefetch_rows_default_follows_the_cpu_or_the_environment(prefetch_default):
    if "S2D_NATIVE_PREFETCH_ROWS" not in os.environ:
        assert prefetch_default == (1 if cpuinfo("vendor_id") == "GenuineIntel" else 4)
    assert in_fresh_process("print(native.prefetch_rows())", S2D_NATIVE_PREFETCH_ROWS="7") == "7"
    with pytest.raises(ValueError, match="1-64"):
        native.prefetch_rows(0)


@pytest.mark.skipif(not has_avx512(), reason="512-bit products need a CPU with AVX-512")
@pytest.mark.parametrize("m,n,k", [(1, 96, 576), (2, 64, 577), (6, 130, 576), (7, 64, 95), (12, 64, 577),
                                   (13, 70, 577), (16, 7, 9), (25, 31, 34), (40, 80, 64), (64, 33, 128),
                                   (19, 20, 33)])
def test_wide_products_are_the_bits_of_the_avx2_kernels(m, n, k, wide_default):
    """The AVX2 level's packed products on 512-bit vectors (CPUs with AVX-512 but no AVX512-BF16): the bits of
    the 256-bit kernels, for calls of 1-12 rows, remainders, odd K and partial panels."""
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    native.wide_products(False)
    narrow = native.linear(x, w, 1)
    native.wide_products(True)
    assert torch.equal(native.linear(x, w, 1), narrow)


@pytest.mark.skipif(not has_avx512(), reason="512-bit products need a CPU with AVX-512")
@pytest.mark.parametrize("name,prefix", [("gqa", 60), ("head64", 280), ("head128", 280)])
def test_wide_passes_are_the_bits_of_avx2_passes(family, monkeypatch, wide_default, name, prefix):
    """Whole passes at the AVX2 level, a prefill of 48-row passes, one-token passes and blocks, past an attention
    chunk (head sizes 64 and 128: P.V on 512-bit vectors too): the same logits with 512-bit vectors as without."""
    monkeypatch.setenv("S2D_NATIVE_ISA", "avx2")
    model = load_model(family[name], dtype="bfloat16")
    ids = torch.randint(0, 257, (1, prefix + 30), generator=torch.Generator().manual_seed(9))

    def passes() -> list[torch.Tensor]:
        cache, out = model.new_cache(), []
        with torch.inference_mode():
            model(ids[:, :prefix], torch.arange(prefix), cache, logits_at=None)
            for start, rows in ((prefix, 1), (prefix + 1, 6), (prefix + 7, 16), (prefix + 23, 7)):
                out.append(model(ids[:, start:start + rows], torch.arange(start, start + rows), cache))
        return out

    native.wide_products(False)
    narrow = passes()
    native.wide_products(True)
    assert all(torch.equal(a, b) for a, b in zip(passes(), narrow))


def test_wide_products_default_and_refusal(wide_default):
    if "S2D_NATIVE_WIDE" not in os.environ:
        assert wide_default == (has_avx512() and "avx512_bf16" not in cpuinfo("flags").split())
    if not has_avx512():
        with pytest.raises(ValueError, match="AVX-512"):
            native.wide_products(True)
        return
    with pytest.MonkeyPatch.context() as mp:  # reports name the kind the passes run on
        mp.setenv("S2D_NATIVE_ISA", "avx2")
        native.wide_products(True)
        assert native.isa_kind() == "AVX512"
        native.wide_products(False)
        assert native.isa_kind() == "AVX2"
    for value in ("0", "1"):
        assert in_fresh_process("print(native.wide_products())", S2D_NATIVE_WIDE=value) == str(value == "1")


@pytest.fixture
def fma_default():
    """Restores whether the AVX512-BF16 level's products run on FMAs (a process-wide value)."""
    before = native.fma_products()
    yield before
    native.fma_products(before)


needs_avx512_level = pytest.mark.skipif(2 not in LEVELS, reason="this CPU lacks AVX512-BF16")


@needs_avx512_level
@pytest.mark.parametrize("m,n,k", [(1, 96, 576), (2, 64, 577), (6, 130, 576), (7, 64, 95), (12, 64, 1536),
                                   (13, 70, 577), (16, 7, 9), (40, 80, 64), (64, 33, 128)])
def test_fma_products_are_the_bits_of_the_avx2_kernels(m, n, k, fma_default):
    """The AVX512-BF16 level's packed products on FMAs: the AVX2 level's bits, for calls of 1-12 rows, remainders,
    odd K and partial panels; on bf16 pair dot products they differ, within float32 rounding of the same sums."""
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    avx2 = native.linear(x, w, 1)
    native.fma_products(True)
    assert torch.equal(native.linear(x, w, 2), avx2)
    native.fma_products(False)
    torch.testing.assert_close(native.linear(x, w, 2), avx2, atol=1e-4, rtol=1e-4)


@needs_avx512_level
@pytest.mark.parametrize("fma", [True, False], ids=["fma", "dot"])
@pytest.mark.parametrize("name,prefix,size", [("gqa", 20, 40), ("head64", 250, 21), ("head128", 37, 16)])
def test_avx512_blocks_are_one_token_passes_on_either_product(family, monkeypatch, fma_default, fma, name, prefix,
                                                              size):
    """Whichever product the AVX512-BF16 level runs (FMAs: the default on Intel; bf16 pair dot products: elsewhere),
    a block's rows are the bits of one-token passes, past an attention chunk and past 12 rows a call."""
    monkeypatch.setenv("S2D_NATIVE_ISA", "avx512")
    native.fma_products(fma)
    block, steps, _, _ = block_and_steps(load_model(family[name], dtype="bfloat16"), prefix, size)
    assert torch.equal(block, steps)


def test_reports_name_the_products_that_run(monkeypatch, fma_default, wide_default):
    """product_kind names the kernels of the level passes use, as the switches set them."""
    for level in LEVELS:
        monkeypatch.setenv("S2D_NATIVE_ISA", ISA_ENV[level])
        if level == 3:
            assert native.product_kind() == "AMX tiles"
        elif level == 2:
            for fma, name in ((True, "float32 FMAs"), (False, "bf16 dot products")):
                native.fma_products(fma)
                assert native.product_kind() == name
        else:
            native.wide_products(False)
            assert native.product_kind() == "256-bit FMAs"
            if has_avx512():
                native.wide_products(True)
                assert native.product_kind() == "512-bit FMAs"


@pytest.mark.parametrize("name,value", [("S2D_NATIVE_FMA", "yes"), ("S2D_NATIVE_WIDE", "2"),
                                        ("S2D_NATIVE_PREFETCH_ROWS", "0"), ("S2D_NATIVE_PREFETCH_ROWS", "65"),
                                        ("S2D_NATIVE_PREFETCH_ROWS", "four"), ("S2D_PREFILL_ROWS", "65"),
                                        ("S2D_PREFILL_ROWS", "-1"), ("S2D_PREFILL_ROWS", "many")])
def test_bad_switch_values_are_refused_by_name(monkeypatch, name, value):
    """The runtime reads its switches once and would ignore these values; making a runtime refuses them instead."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        native.isa_level()
    monkeypatch.setenv(name, "")  # empty: unset
    assert native.isa_level() in LEVELS


def test_fma_products_default_follows_the_cpu_or_the_environment(fma_default):
    if "S2D_NATIVE_FMA" not in os.environ:
        assert fma_default == (cpuinfo("vendor_id") == "GenuineIntel" and "amx_bf16" in cpuinfo("flags").split())
    for value in ("0", "1"):
        assert in_fresh_process("print(native.fma_products())", S2D_NATIVE_FMA=value) == str(value == "1")


def test_bf16_stores_round_as_the_scalar_rule(isa):
    """Vector stores of activations round as the scalar f2bf: nearest even, NaN kept NaN (quiet, its high bits)."""
    g = torch.Generator().manual_seed(5)
    special = [0x3F808000, 0x3F818000, 0xBF808000, 0x3F807FFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000,
               0x7F800001, 0xFFC00001, 0x7FA12345, 0x00008000, 0x00018000, 0x80000000, 0x00000001, 0x477FFFFF]
    bits = torch.cat([torch.tensor(special, dtype=torch.int64),
                      torch.randint(0, 2**32, (1021,), generator=g, dtype=torch.int64)])  # a tail past whole vectors
    x = bits.to(torch.int32).view(torch.float32)
    got = native.put_bf16(x, isa).view(torch.int16).to(torch.int64) & 0xFFFF
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    want = torch.where(nan, (bits >> 16) | 0x40, rounded)
    assert torch.equal(got, want)
    finite = ~nan
    assert torch.equal(got[finite], x[finite].bfloat16().view(torch.int16).to(torch.int64) & 0xFFFF)  # torch's rounding


def product_gflops(level: int) -> float:
    """GFLOP/s of the runtime's own product at ``level``: 16 rows against a [1024, 576] weight in cache."""
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(16, 576, generator=g).bfloat16(), torch.randn(1024, 576, generator=g).bfloat16()
    out = torch.empty(16, 1024)
    native.linear(x, w, level, out=out)
    t0 = time.perf_counter()
    for _ in range(50):
        native.linear(x, w, level, out=out)
    return 2 * 16 * 1024 * 576 * 50 / (time.perf_counter() - t0) / 1e9


@pytest.mark.parametrize("fma", [True, False], ids=["fma", "dot"])
def test_dot_peak_is_a_ceiling_the_products_stay_under(isa, fma, fma_default):
    """The multiply-add ceiling costs.py bounds ratios with: above what the runtime's own product reaches in cache
    (a folded loop or a wrong flop count would break either side of this), and below a physical limit; at the
    AVX512-BF16 level for either product it runs (fma_products)."""
    if isa != 2 and not fma:
        pytest.skip("fma_products concerns the AVX512-BF16 level only")
    native.fma_products(fma)
    product = product_gflops(isa)
    ceiling = native.dot_peak(isa, seconds=0.02)
    if isa >= 3:
        assert ceiling is None  # AMX tiles: not measured
        return
    assert product < 1.15 * ceiling < 1.15 * 200 * torch.get_num_threads() * 64  # <= 64 flops a cycle at 200 GHz


@pytest.mark.skipif(not has_avx512(), reason="512-bit products need a CPU with AVX-512")
def test_wide_dot_peak_counts_sixteen_lanes(wide_default):
    """With the AVX2 level's products on 512-bit vectors, the ceiling is the 512-bit FMAs' rate: above the
    256-bit one (each 512-bit FMA counts 16 lanes), and above what the wide product reaches in cache."""
    narrow, wide = 0.0, 0.0
    for _ in range(5):  # alternated, the best of each: another process's load spreads over both
        native.wide_products(False)
        narrow = max(narrow, native.dot_peak(1, seconds=0.02))
        native.wide_products(True)
        wide = max(wide, native.dot_peak(1, seconds=0.02))
    assert wide > 1.2 * narrow
    assert product_gflops(1) < 1.15 * wide


def test_handoff_times_two_threads_and_needs_two():
    if native.library() is None:
        pytest.skip("no native runtime here")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ns = native.handoff_ns(2000)
        assert ns is not None and 1 < ns < 1e6  # a hand-off between cores: from nanoseconds to a time slice
        torch.set_num_threads(1)
        assert native.handoff_ns() is None
    finally:
        torch.set_num_threads(threads)


def test_product_writes_into_out_and_refuses_a_wrong_one():
    """``out`` takes the product in place (measurements reuse it); a wrong shape, dtype or layout is refused."""
    if native.library() is None:
        pytest.skip("no native runtime here")
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 576, generator=g).bfloat16(), torch.randn(70, 576, generator=g).bfloat16()
    out = torch.full((6, 70), float("nan"))
    assert native.linear(x, w, out=out) is out
    assert torch.equal(out, native.linear(x, w))
    for bad in (torch.empty(6, 71), torch.empty(6, 70, dtype=torch.bfloat16), torch.empty(70, 6).T):
        with pytest.raises(ValueError, match="out must be"):
            native.linear(x, w, out=bad)


def test_packed_weights_follow_in_place_changes(family, monkeypatch):
    """Where the runtime packs bf16 weights, an in-place change (an optimizer step) rebuilds the copy."""
    if 2 not in LEVELS:
        pytest.skip("packed weights are an AVX512-BF16 path")
    monkeypatch.setenv("S2D_NATIVE_ISA", "avx512")
    model = load_model(family["gqa"], dtype="bfloat16")
    ids = torch.randint(0, 257, (1, 6))
    with torch.inference_mode():
        before = model.native_runtime()
        assert before.packed and not before.stale()
        model.layers[0].gate_up.weight.mul_(2)
        assert before.stale()
        got = model(ids, torch.arange(6), model.new_cache())
        assert model.native_runtime() is not before
        want = reference(model)(ids, torch.arange(6), reference(model).new_cache())
        torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)
        # norms are read in place, not packed: a change to one needs no rebuild, and passes see it at once
        after = model.native_runtime()
        model.layers[1].attn_norm.mul_(3)
        assert not after.stale()
        got = model(ids, torch.arange(6), model.new_cache())
        assert model.native_runtime() is after
        want = reference(model)(ids, torch.arange(6), reference(model).new_cache())
        torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)


def test_a_model_loaded_in_inference_mode_runs(family):
    """Inference tensors have no version counter: the packed copy's staleness check skips them."""
    with torch.inference_mode():
        model = load_model(family["gqa"], dtype="bfloat16")
        ids = torch.randint(0, 257, (1, 5))
        got = model(ids, torch.arange(5), model.new_cache())
    assert torch.isfinite(got.float()).all()


@pytest.mark.parametrize("level", [1, 2, 3], ids=["avx2", "avx512", "amx"])
@pytest.mark.parametrize("pack", ["1", "0"], ids=["packed", "in-place"])
def test_block_rows_equal_one_token_passes_packed_or_not(family, monkeypatch, pack, level):
    """bf16 on AVX2, AVX512-BF16 and AMX, weights packed or read in place (S2D_NATIVE_PACK=0): a block's rows are
    the bits of one-token passes, and the two layouts agree within bf16 rounding."""
    if level not in LEVELS:
        pytest.skip("this CPU lacks the instruction set")
    monkeypatch.setenv("S2D_NATIVE_ISA", ISA_ENV[level])
    monkeypatch.setenv("S2D_NATIVE_PACK", pack)
    model = load_model(family["gqa"], dtype="bfloat16")
    assert model.native_runtime().packed == (pack == "1")
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        block_cache, token_cache = model.new_cache(), model.new_cache()
        model(ids[:, :20], torch.arange(20), block_cache, logits_at=None)
        model(ids[:, :20], torch.arange(20), token_cache, logits_at=None)
        block = model(ids[:, 20:40], torch.arange(20, 40), block_cache)
        for t in range(20, 40):
            assert torch.equal(model(ids[:, t:t + 1], torch.arange(t, t + 1), token_cache)[0, 0], block[0, t - 20])
        want = reference(model)(ids, torch.arange(40), reference(model).new_cache())[0, 20:]
    torch.testing.assert_close(block[0].float(), want.float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("level", [1, 2, 3], ids=["avx2", "avx512", "amx"])
def test_passes_on_two_threads_are_the_bits_of_one(family, monkeypatch, level):
    """Passes of up to 16 rows hand a product's panels out at run time (each thread its own half in order,
    then what is left of the other's): on two threads every row is the bits of the one-thread pass, for
    one-token passes and blocks, whichever thread computed which panel."""
    if level not in LEVELS:
        pytest.skip("this CPU lacks the instruction set")
    monkeypatch.setenv("S2D_NATIVE_ISA", ISA_ENV[level])
    model = load_model(family["gqa"], dtype="bfloat16")
    assert model.native_runtime().packed
    ids = torch.randint(0, 257, (1, 60), generator=torch.Generator().manual_seed(5))

    def passes() -> list[torch.Tensor]:
        cache, out = model.new_cache(), []
        with torch.inference_mode():
            model(ids[:, :20], torch.arange(20), cache, logits_at=None)
            for start, rows in ((20, 1), (21, 6), (27, 16), (43, 1), (44, 9)):
                out.append(model(ids[:, start:start + rows], torch.arange(start, start + rows), cache))
        return out

    with native.threads(1):
        one = passes()
    with native.threads(2):
        for _ in range(3):  # who takes which panel changes from run to run; the bits must not
            assert all(torch.equal(a, b) for a, b in zip(passes(), one))


@pytest.mark.parametrize("name,prefix", [("gqa", 30), ("qwen", 30), ("long", 600)])
def test_passes_match_the_reference_in_float32(isa, family, name, prefix):
    """One-token, block and tree-masked passes: logits within float32 rounding of the torch path."""
    model = load_model(family[name], dtype="float32")
    assert model.native_runtime() is not None and model.native_runtime().isa == native.ISA_NAMES[isa]
    ref = reference(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 257, (1, prefix + 10), generator=g)
    end = prefix + 10
    with torch.inference_mode():
        caches = [model.new_cache(), ref.new_cache()]
        assert caches[0].k.dtype == torch.float32
        for m, c in zip((model, ref), caches):
            m(ids[:, :prefix], torch.arange(prefix), c, logits_at=None)  # the prefix, through each path
        # one token, a block of 6, a block of 3
        for start, stop in ((prefix, prefix + 1), (prefix + 1, prefix + 7), (prefix + 7, end)):
            got = model(ids[:, start:stop], torch.arange(start, stop), caches[0])
            want = ref(ids[:, start:stop], torch.arange(start, stop), caches[1]).float()
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(caches[0].k[:, :, :, :end], caches[1].k[:, :, :, :end], atol=1e-5, rtol=1e-5)
        # a tree: two branches of two tokens after the prefix, positions per depth
        tree = torch.tensor([[11, 12, 13, 14]])
        positions = torch.tensor([end, end + 1, end, end + 1])
        mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
        got = model(tree, positions, caches[0], block_mask=mask)
        want = ref(tree, positions, caches[1], block_mask=mask).float()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_layer_ranges_and_logits_rows(isa, family):
    model = load_model(family["draft"], dtype="float32")
    ref = reference(model)
    ids = torch.randint(0, 257, (1, 9))
    with torch.inference_mode():
        c1, c2 = model.new_cache(), ref.new_cache()
        h = model.run_layers(model.embed_tokens(ids), torch.arange(9), c1, 0, 1)
        h = model.run_layers(h, torch.arange(9), c1, 1, 3)
        want = ref.run_layers(ref.embed_tokens(ids), torch.arange(9), c2, 0, 3)
        torch.testing.assert_close(h, want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(model.logits(h[0, 3]), ref.logits(want[0, 3]), atol=2e-5, rtol=1e-4)
        assert model.logits(h).shape == (1, 9, 257)


def block_and_steps(model, prefix: int, size: int):
    """The logits of ``size`` tokens after a ``prefix``-token prefill as one block pass and as one-token passes,
    and the two caches: (block [1, size, V], steps [1, size, V], block_cache, step_cache)."""
    end = prefix + size
    ids = torch.randint(0, 257, (1, end), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        block_cache, step_cache = model.new_cache(), model.new_cache()
        for c in (block_cache, step_cache):
            model(ids[:, :prefix], torch.arange(prefix), c, logits_at=None)
        block = model(ids[:, prefix:end], torch.arange(prefix, end), block_cache)
        steps = torch.cat([model(ids[:, i:i + 1], torch.tensor([i]), step_cache) for i in range(prefix, end)], 1)
    return block, steps, block_cache, step_cache


# 250: the block crosses a chunk border; 40 tokens: more rows than one AMX tile holds
@pytest.mark.parametrize("name,prefix,size", [("gqa", 20, 10), ("long", 250, 10), ("gqa", 20, 40), ("head64", 250, 21),
                                              ("head128", 37, 40)])
def test_bf16_block_pass_is_bit_identical_to_one_token_passes(isa, family, name, prefix, size):
    """Why greedy speculative decoding equals plain decoding even in bfloat16 on this runtime."""
    block, steps, block_cache, step_cache = block_and_steps(load_model(family[name], dtype="bfloat16"), prefix, size)
    assert block_cache.k.dtype == torch.bfloat16  # the runtime reads a cache in the model's dtype
    assert torch.equal(block, steps)
    end = prefix + size
    assert torch.equal(block_cache.k[:, :, :, :end], step_cache.k[:, :, :, :end])


@pytest.mark.parametrize("level", [1, 2, 3], ids=["avx2", "avx512", "amx"])
def test_a_long_prefill_runs_on_the_runtime_bit_identical_to_one_token_passes(family, monkeypatch, level):
    """Where weights are packed, a causal block of more than MAX_ROWS rows (a prefill) runs as passes of
    ``prefill_rows`` rows on the runtime (64 with AMX, 48 elsewhere): its cache holds the bits one-token passes
    write, wherever the prompt is cut, and stays within bf16 rounding of torch's prefill."""
    if level not in LEVELS:
        pytest.skip("this CPU lacks the instruction set")
    monkeypatch.setenv("S2D_NATIVE_ISA", ISA_ENV[level])
    model = load_model(family["long"], dtype="bfloat16")
    runtime = model.native_runtime()
    assert runtime.prefill_rows == (native.AMX_PREFILL_ROWS if level == 3 else native.PREFILL_ROWS) > 0
    n = 300
    ids = torch.randint(0, 257, (1, n), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        whole, cut, steps = model.new_cache(), model.new_cache(), model.new_cache()
        hidden = model.run_layers(model.embed_tokens(ids), torch.arange(n), whole)
        for a, b in ((0, 100), (100, 290), (290, n)):
            model.run_layers(model.embed_tokens(ids[:, a:b]), torch.arange(a, b), cut)
        for i in range(n):
            model.run_layers(model.embed_tokens(ids[:, i:i + 1]), torch.arange(i, i + 1), steps)
        runtime.prefill_rows = 0  # the same prefill on torch
        on_torch = model.new_cache()
        model.run_layers(model.embed_tokens(ids), torch.arange(n), on_torch)
    assert hidden.shape == (1, n, model.cfg.hidden_size)
    for other in (cut, steps):
        assert torch.equal(whole.k[:, :, :, :n], other.k[:, :, :, :n])
        assert torch.equal(whole.v[:, :, :, :n], other.v[:, :, :, :n])
    assert whole.lengths == [n] * model.cfg.num_layers
    torch.testing.assert_close(whole.v[:, :, :, :n].float(), on_torch.v[:, :, :, :n].float(), atol=0.05, rtol=0.05)


def test_a_wide_model_prefills_on_torch(family, monkeypatch):
    """Past PREFILL_MAX_WIDTH the runtime's prefill passes measured slower than torch's: such a model keeps torch."""
    model = load_model(family["long"], dtype="bfloat16")
    if not model.native_runtime().packed:
        pytest.skip("this CPU does not pack weights")
    monkeypatch.setattr(native, "PREFILL_MAX_WIDTH", model.cfg.hidden_size - 1)
    monkeypatch.setattr(native, "AMX_PREFILL_MAX_WIDTH", model.cfg.hidden_size - 1)
    model.drop_native()
    assert model.native_runtime().prefill_rows == 0


def test_amx_packs_its_weights_and_prefills_narrow_models_on_the_runtime(family, monkeypatch):
    """With AMX the tiles read packed panels; a prefill runs in 64-row passes on them up to AMX_PREFILL_MAX_WIDTH
    (oneDNN builds a kernel for every new prompt length), wider models on torch; S2D_PREFILL_ROWS sets the rows."""
    if 3 not in LEVELS:
        pytest.skip("this CPU has no AMX")
    monkeypatch.setenv("S2D_NATIVE_ISA", "amx")
    model = load_model(family["long"], dtype="bfloat16")
    runtime = model.native_runtime()
    assert runtime.isa == "AMX" and runtime.packed and runtime.prefill_rows == native.AMX_PREFILL_ROWS == 64
    monkeypatch.setenv("S2D_PREFILL_ROWS", "32")
    model.drop_native()
    assert model.native_runtime().prefill_rows == 32
    monkeypatch.setattr(native, "AMX_PREFILL_MAX_WIDTH", model.cfg.hidden_size - 1)
    model.drop_native()
    assert model.native_runtime().prefill_rows == 0


def test_prefill_rows_follow_the_instruction_set_the_width_and_the_setting(monkeypatch):
    monkeypatch.delenv("S2D_PREFILL_ROWS", raising=False)
    assert native.prefill_rows(3, 384, True) == 64 and native.prefill_rows(3, 576, True) == 0
    assert native.prefill_rows(2, 576, True) == native.prefill_rows(1, 2048, True) == 48
    assert native.prefill_rows(2, 4096, True) == native.prefill_rows(3, 576, False) == 0
    monkeypatch.setenv("S2D_PREFILL_ROWS", "0")
    assert native.prefill_rows(3, 384, True) == native.prefill_rows(1, 576, True) == 0


@pytest.mark.parametrize("method", ["sd", "pld", "sd-exit-1", "s2d"])
def test_greedy_outputs_equal_the_reference_path(isa, family, method):
    """Plain and speculative greedy decoding: token-identical to the torch reference path (float32)."""
    target = load_model(family["gqa"], dtype="float32")
    draft = load_model(family["draft"], dtype="float32")
    prompt = [7, 3, 9, 7, 3, 1, 12, 40, 41, 42] * 3
    outputs = []
    for use_native in (True, False):
        target.use_native = draft.use_native = use_native
        ar = Engine(target, eos_token_ids=()).generate(prompt, SamplingParams(), 40).output
        drafter = build_drafter(method, draft, DraftOptions(num_draft_tokens=4, exit_thresholds=(0.05, 0.05, 0)
                                                            if method == "s2d" else ()))
        spec = Engine(target, drafter, 4, eos_token_ids=()).generate(prompt, SamplingParams(), 40)
        assert spec.output == ar
        outputs.append(ar)
    assert outputs[0] == outputs[1]


def test_bf16_speculative_greedy_equals_plain_greedy(family):
    target = load_model(family["gqa"], dtype="bfloat16")
    draft = load_model(family["draft"], dtype="bfloat16")
    prompt = list(range(30, 60)) * 2
    plain = Engine(target, eos_token_ids=()).generate(prompt, SamplingParams(), 60).output
    for method in ("sd", "pld", "s2d"):
        drafter = build_drafter(method, draft, DraftOptions(num_draft_tokens=5))
        assert Engine(target, drafter, 5, eos_token_ids=()).generate(prompt, SamplingParams(), 60).output == plain


def test_runtime_follows_the_model_tensors(family):
    model = load_model(family["gqa"], dtype="float32")
    first = model.native_runtime()
    assert first is not None
    model.to(torch.bfloat16)  # new tensors: the old runtime must not be used
    assert model._native is None and model.native_runtime() is not first and model.native_runtime().bf16
    model.load_state_dict(model.state_dict())
    assert model._native is None
    clone = copy.deepcopy(model)  # a copy builds its own
    assert clone.native_runtime() is not None and clone.native_runtime() is not model.native_runtime()
    with torch.inference_mode():
        ids = torch.randint(0, 257, (1, 5))
        assert torch.equal(clone(ids, torch.arange(5), clone.new_cache()), model(ids, torch.arange(5), model.new_cache()))


def test_positions_outside_the_rope_table_are_refused(family):
    model = load_model(family["gqa"], dtype="float32")
    with torch.inference_mode(), pytest.raises(ValueError, match="positions"):
        model(torch.tensor([[1, 2]]), torch.tensor([5, model.cfg.max_positions]), model.new_cache())


def test_profile_counts_each_phase(family):
    model = load_model(family["gqa"], dtype="float32")
    rt = model.native_runtime()
    rt.profile(True)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), torch.arange(3), model.new_cache())
    times = rt.profile(False)
    assert set(times) == set(native.PHASES) and all(v > 0 for v in times.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_top1_agrees_with_softmax_argmax(isa, family, dtype):
    model = load_model(family["gqa"], dtype=dtype)
    ref = reference(model)
    g = torch.Generator().manual_seed(7)
    subset = torch.randperm(257, generator=g)[:100]
    head = model.lm_head.weight[subset].contiguous()
    with torch.inference_mode():
        for _ in range(5):
            h = torch.randn(model.cfg.hidden_size, generator=g).to(model.dtype)
            for w in (None, head):
                token, prob = model.top1(h, w)
                ref_token, ref_prob = ref.top1(h, w)
                logits = model.logits(h[None]) if w is None else model.native_runtime().logits(h[None], w)
                assert token == int(logits.argmax()) and token == ref_token
                # the reference rounds bf16 logits before its softmax; ours keeps them in float32
                assert prob == pytest.approx(ref_prob, rel=5e-2 if dtype == "bfloat16" else 1e-5)


def test_greedy_pass_matches_forward_argmax(isa, family):
    model = load_model(family["gqa"], dtype="bfloat16")
    ref = reference(model)
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        for m in (model, ref):
            caches = [m.new_cache(), m.new_cache()]
            for c in caches:
                m(ids[:, :30], torch.arange(30), c, logits_at=None)
            got = m.greedy(ids[:, 30:], torch.arange(30, 40), caches[0])
            want = m(ids[:, 30:], torch.arange(30, 40), caches[1])[0].argmax(-1)
            assert got.dtype == torch.long and torch.equal(got, want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["gqa", "qwen", "long"])
def test_one_call_greedy_pass_is_the_bits_of_layers_then_head(isa, family, name, dtype):
    """``greedy_hidden``'s and ``greedy``'s one native call (embedding, layers, head) against ``run_layers``
    then ``argmax``: the same tokens, hidden states, cache contents and lengths, for 1 to 64 rows and a tree."""
    model = load_model(family[name], dtype=dtype)
    limit = 300 if name == "long" else 60  # "long": contexts past one attention chunk
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.cfg.vocab_size, (1, limit + 64), generator=gen)
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    with torch.inference_mode():
        fused, split, bare = (model.new_cache(capacity=limit + 64) for _ in range(3))
        for c in (fused, split, bare):
            model(ids[:, :limit - 20], torch.arange(limit - 20), c, logits_at=None)
        for rows, mask in ((1, None), (7, None), (4, tree), (64, None)):
            block = ids[:, limit:limit + rows]
            pos = torch.arange(limit, limit + rows)
            tokens, hidden = model.greedy_hidden(block, pos, fused, mask)
            want_hidden = model.run_layers(model.embed_tokens(block), pos, split, block_mask=mask)[0]
            want = model.argmax(want_hidden)
            assert torch.equal(tokens, want) and tokens.dtype == torch.long
            assert torch.equal(hidden, want_hidden)
            assert fused.lengths == split.lengths
            assert torch.equal(fused.k, split.k) and torch.equal(fused.v, split.v)
            assert torch.equal(model.greedy(block, pos, bare, mask), want)  # tokens only: the runtime's own rows
            assert bare.lengths == split.lengths and torch.equal(bare.k, split.k)
            for c in (fused, split, bare):
                c.truncate(limit - 20)


def test_one_call_greedy_pass_refuses_bad_input_and_keeps_the_cache(family):
    model = load_model(family["gqa"], dtype="bfloat16")
    with torch.inference_mode():
        cache = model.new_cache(capacity=16)
        model(torch.arange(1, 9)[None], torch.arange(8), cache, logits_at=None)
        keys = cache.k.clone()
        with pytest.raises(IndexError, match="token ids must lie in"):
            model.greedy(torch.tensor([[3, model.cfg.vocab_size]]), torch.arange(8, 10), cache)
        with pytest.raises(ValueError, match="positions must lie"):
            model.greedy(torch.tensor([[3]]), torch.tensor([10**6]), cache)
        with pytest.raises(ValueError, match="cache overflow"):
            model.greedy(torch.arange(1, 10)[None], torch.arange(8, 17), cache)
        assert cache.lengths == [8] * model.cfg.num_layers and torch.equal(cache.k, keys)
        # logits that are not finite: refused after the layers wrote the block, as run_layers then argmax
        model.norm.data.fill_(float("inf"))
        model.drop_native()
        with pytest.raises(CheckpointError):
            model.greedy(torch.tensor([[3, 4]]), torch.arange(8, 10), cache)
        assert cache.lengths == [10] * model.cfg.num_layers


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["gqa", "qwen", "long"])
def test_plain_greedy_fast_step_equals_the_general_step(isa, family, name, dtype):
    """``decode_step``'s plain greedy path (``greedy_token``: ints, no tensors) against the general step with an
    empty draft: the same tokens, statistics, cache contents and lengths, EOS and the token budget included."""
    from s2d.decode import _general_step, decode_step, prefill

    model = load_model(family[name], dtype=dtype)
    prompt = torch.randint(1, model.cfg.vocab_size, (300 if name == "long" else 30,),
                           generator=torch.Generator().manual_seed(3)).tolist()
    runs = []
    for step in (decode_step, _general_step):
        state = prefill(model, prompt, SamplingParams(), 40, model.new_cache(), None, 1)
        out = [step(model, state, frozenset()) for _ in range(39)]
        eos = frozenset({out[10][0]})  # the 11th token ends a second run's output early
        second = prefill(model, prompt, SamplingParams(), 40, model.new_cache(), None, 1)
        while not second.finished:
            step(model, second, eos)
        runs.append((state, out, second))
    (fast, fast_out, fast_eos), (ref, ref_out, ref_eos) = runs
    assert fast_out == ref_out and fast.tokens == ref.tokens
    assert fast.finished == ref.finished and fast_eos.tokens == ref_eos.tokens and fast_eos.finished
    assert len(fast_eos.output) <= 11
    for a, b in ((fast, ref), (fast_eos, ref_eos)):
        assert a.cache.lengths == b.cache.lengths
        assert torch.equal(a.cache.k, b.cache.k) and torch.equal(a.cache.v, b.cache.v)
        for attr in ("target_passes", "new_tokens", "proposed", "accepted", "proposed_at", "accepted_at",
                     "exit_counts"):
            assert getattr(a.stats, attr) == getattr(b.stats, attr), attr
    assert fast.stats.verify_s > 0 and not fast.finished
    decode_step(model, fast, frozenset())  # the 40th token: the budget is spent
    assert fast.finished and len(fast.output) == 40
    with pytest.raises(InputError, match="finished"):
        decode_step(model, fast, frozenset())


def test_greedy_token_is_greedy_of_one_row_and_refuses_bad_input(isa, family):
    model = load_model(family["gqa"], dtype="bfloat16")
    ref = reference(model)
    with torch.inference_mode():
        caches = [model.new_cache(capacity=16), ref.new_cache(capacity=16)]
        for m, c in zip((model, ref), caches):
            m(torch.arange(1, 9)[None], torch.arange(8), c, logits_at=None)
        want = model.greedy(torch.tensor([[5]]), torch.tensor([8]), copy.deepcopy(caches[0]))
    # outside inference mode too: the fast path makes no tensor, the reference path enters inference mode itself
    for m, c in zip((model, ref), caches):
        assert m.greedy_token(5, 8, c) == int(want[0]) and c.lengths == [9] * m.cfg.num_layers
    cache = caches[0]
    keys = cache.k.clone()
    with pytest.raises(IndexError, match="token ids must lie in"):
        model.greedy_token(model.cfg.vocab_size, 9, cache)
    with pytest.raises(ValueError, match="positions must lie"):
        model.greedy_token(3, 10**6, cache)
    full = model.new_cache(capacity=9)
    full.lengths = [9] * model.cfg.num_layers
    with pytest.raises(ValueError, match="cache overflow"):
        model.greedy_token(3, 9, full)
    assert cache.lengths == [9] * model.cfg.num_layers and torch.equal(cache.k, keys)
    model.norm.data.fill_(float("inf"))  # logits that are not finite: refused after the layers wrote the token
    with pytest.raises(CheckpointError):
        model.greedy_token(3, 9, cache)
    assert cache.lengths == [10] * model.cfg.num_layers


def test_own_thread_pool_gives_the_same_tokens(family):
    """Without torch's OpenMP team (S2D_NATIVE_POOL=own) passes run on the runtime's own threads."""
    import subprocess
    import sys

    code = ("import sys, torch; torch.set_num_threads(2); from s2d.model.loading import load_model; "
            "from s2d.engine import Engine; from s2d.sampling import SamplingParams; "
            f"m = load_model({str(family['gqa'])!r}, dtype='bfloat16'); "
            "print(Engine(m, eos_token_ids=()).generate(list(range(20, 50)), SamplingParams(), 24).output)")
    outs = []
    for pool in ("own", "openmp"):
        env = {**__import__("os").environ, "S2D_NATIVE_POOL": pool}
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr
        outs.append(run.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1]


def test_passes_run_on_torchs_own_libgomp_when_another_copy_is_loaded_first(monkeypatch):
    """sentencepiece ships its own libgomp (``from transformers import AutoTokenizer`` loads it), and it may be mapped
    before torch's: the runtime must still join torch's team, not start a second one that fights it for the cores."""
    monkeypatch.delenv("S2D_NATIVE_POOL", raising=False)
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch is not built with OpenMP")
    ours = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    other = Path("/site-packages/sentencepiece.libs/libgomp-6a29c32d.so.1.0.0")
    line = "7f00-7f10 r-xp 00000000 08:01 42        {}"
    maps = "\n".join([line.format("/usr/lib/libc.so.6"), line.format(other), line.format(other), line.format(ours)])
    assert native._torch_openmp(maps) == ours
    assert native._torch_openmp("\n".join([line.format(other)])) == other  # no copy of torch's: the only one
    assert native._torch_openmp(line.format("/usr/lib/libc.so.6")) is None
    monkeypatch.setenv("S2D_NATIVE_POOL", "own")
    assert native._torch_openmp(maps) is None


def test_the_runtime_joins_torchs_libgomp_after_sentencepiece_is_loaded():
    """In a process that loaded sentencepiece's libgomp first, the one the runtime uses is torch's."""
    pytest.importorskip("sentencepiece")
    code = ("import torch, sentencepiece; from s2d.model import native; "
            "print(native._torch_openmp(), torch.__file__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    gomp, torch_file = run.stdout.split()
    if gomp != "None":
        assert "sentencepiece" not in gomp and gomp.startswith(str(Path(torch_file).parent.parent)), gomp


def test_nonfinite_logits_are_refused_on_the_native_path(family):
    from s2d.model.config import CheckpointError

    model = load_model(family["gqa"], dtype="float32")
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")  # after loading: only a pass can notice
    with torch.inference_mode():
        with pytest.raises(CheckpointError, match="NaN or inf"):
            model.greedy(torch.tensor([[1, 2, 3]]), torch.arange(3), model.new_cache())
        with pytest.raises(CheckpointError, match="NaN or inf"):
            model.top1(torch.ones(model.cfg.hidden_size))


@pytest.mark.parametrize("name,prefix", [("gqa", 30), ("head64", 300), ("head128", 30)])
def test_bf16_passes_stay_close_to_float32(isa, family, name, prefix):
    """bf16 weights through every path of this CPU (AMX attention rounds probabilities to bf16)."""
    m16 = load_model(family[name], dtype="bfloat16")
    m32 = reference(load_model(family[name], dtype="float32"))
    ids = torch.randint(0, 257, (1, prefix + 10), generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        c16, c32 = m16.new_cache(), m32.new_cache()
        for m, c in ((m16, c16), (m32, c32)):
            m(ids[:, :prefix], torch.arange(prefix), c, logits_at=None)
        a = m16(ids[:, prefix:], torch.arange(prefix, prefix + 10), c16).float()
        b = m32(ids[:, prefix:], torch.arange(prefix, prefix + 10), c32)
    assert (a - b).abs().max() < 0.05 * b.abs().max()
