"""A lean Llama-family decoder (Llama, Mistral, Qwen2) for incremental and speculative decoding.

Differences from transformers' forward, on purpose: q/k/v and gate/up projections are fused into one
matrix each (fewer kernel launches, which dominate small models on CPU), the KV cache is static and
written by slot, callers choose which layers run and which positions get logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from s2d.model import native
from s2d.model.cache import KVCache
from s2d.model.config import CheckpointError, ModelConfig
from s2d.sampling import check_finite_logits

_R = TypeVar("_R")  # what a native pass returns (Transformer._native_append)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies [head_dim/2], with linear or llama3 scaling when the config asks."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling.get("original_max_position_embeddings", cfg.max_positions))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.float()


@dataclass
class SequenceRows:
    """One sequence's new rows in a pass over several sequences (``Transformer.run_layers_multi``)."""

    hidden: Tensor  # [T_i, C] the rows' inputs
    positions: Tensor  # [T_i] their RoPE positions
    cache: KVCache  # this sequence's cache; the rows are appended after its filled length
    block_mask: Tensor | None = None  # [T_i, T_i] bool among its rows (a tree); None: causal (a chain)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.eps = cfg.rms_norm_eps
        self.attn_norm = nn.Parameter(torch.ones(c))
        self.qkv = nn.Linear(c, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.num_heads * d, c, bias=cfg.o_bias)
        self.mlp_norm = nn.Parameter(torch.ones(c))
        self.gate_up = nn.Linear(c, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, c, bias=cfg.mlp_bias)


def _cpu_lacks_bf16() -> bool:
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return True


# CPUs without native bf16 (no AVX512-BF16/AMX, e.g. AVX2-only x86) multiply a bf16 matrix by
# M > 1 rows about M times as slowly as by one row. Passes over a few tokens go to the native runtime
# there (s2d/model/native); longer ones (prefill) upcast the weight to float32 for torch's float32 GEMM
# (exact, and far faster than its bf16 path). Measured: benchmarks/RESULTS.md, "Measurements behind the code".
CPU_BF16_UPCAST = _cpu_lacks_bf16()
UPCAST_MIN_ROWS = 8


def linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """layer(x); on CPUs without native bf16, long bf16 inference blocks upcast as described above."""
    if (CPU_BF16_UPCAST and x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and layer.weight.dtype == torch.bfloat16 and x.numel() // x.shape[-1] >= UPCAST_MIN_ROWS):
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x.float(), layer.weight.float(), bias).to(x.dtype)
    return layer(x)


# torch prefers cuDNN's attention on Hopper GPUs, and cuDNN builds a graph for every new shape (hundreds of
# ms each, cached by shape): decoding grows the key length by a step each pass, so nearly every pass paid it
# (H200: the first 128 tokens of a prompt at 22 tok/s, 465 once the same lengths recurred). Flash and the
# memory-efficient kernels take any length without a build.
_GPU_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, causal: bool, gqa: bool) -> Tensor:
    """q [B, H, T, D], keys/values [B, Hkv, S, D], mask [T, S] bool (True = may attend) -> [B, H, T, D]."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    with sdpa_kernel(_GPU_ATTENTION):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # As transformers does: normalise in float32, cast back, then scale.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_rope()
        # The native CPU runtime (s2d/model/native) serves inference passes over <= native.MAX_ROWS
        # tokens of batch 1; set False to force the torch reference path (tests compare the two).
        self.use_native = True
        self.checkpoint_dir = None  # set by load_model: where files stored beside the weights live
        self._native: native.NativeRuntime | None | bool = None  # None: not built yet; False: not served
        self.register_load_state_dict_post_hook(lambda module, _: module.drop_native())

    def drop_native(self) -> None:
        """Forget the native runtime (it points at tensors that are being replaced)."""
        self._native = None

    def __getstate__(self) -> dict:  # copies and pickles rebuild their own runtime
        state = dict(super().__getstate__())
        state["_native"] = None
        return state

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cuda(), ... give new tensors
        self.drop_native()
        return super()._apply(fn, recurse)

    def native_runtime(self) -> "native.NativeRuntime | None":
        """The native runtime serving this model's inference passes, or None (torch reference path)."""
        if not self.use_native:
            return None
        if self._native is None or (self._native and self._native.stale()):
            self._native = native.NativeRuntime.create(self) or False
        return self._native or None

    def _native_for(self, hidden: Tensor) -> "native.NativeRuntime | None":
        if hidden.shape[0] != 1 or torch.is_grad_enabled() or hidden.device.type != "cpu":
            return None
        return self.native_runtime()

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables [max_positions, D] on the model's device (after a meta init)."""
        self.drop_native()
        device = self.embed.weight.device
        inv_freq = rope_inv_freq(self.cfg).to(device)
        angles = torch.outer(torch.arange(self.cfg.max_positions, dtype=torch.float32, device=device), inv_freq)
        # rotate_half(x) * sin == roll(x, D/2) * [-sin, sin]: one roll instead of split + cat.
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], -1), persistent=False)
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], -1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_cache(self, batch: int = 1, capacity: int | None = None, num_layers: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache, by default in the weights' dtype, except on CPU without the native runtime.

        Why: torch's CPU attention kernel is several times slower for one bfloat16 query than for one
        float32 query (benchmarks/RESULTS.md, "Measurements behind the code"), so the torch path keeps
        a float32 cache;
        the native runtime reads a bf16 cache at half the memory traffic. Either holds the same
        values: keys and values are rounded to the model's dtype before they are stored.
        """
        cfg = self.cfg
        if dtype is None:
            cpu_reference = self.device.type == "cpu" and (batch != 1 or self.native_runtime() is None)
            dtype = torch.float32 if cpu_reference else self.dtype
        return KVCache(num_layers or cfg.num_layers, batch, cfg.num_kv_heads, capacity or cfg.max_positions,
                       cfg.head_dim, dtype, self.device)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """ids [B, T] -> hidden [B, T, C]."""
        return self.embed(ids)

    def run_layers(self, hidden: Tensor, positions: Tensor, cache: KVCache, start: int = 0,
                   end: int | None = None, block_mask: Tensor | None = None) -> Tensor:
        """Run layers ``start .. end-1`` over a block of T new tokens and append them to ``cache``.

        hidden [B, T, C]; positions [T] (RoPE positions, which in a tree differ from cache slots);
        block_mask [T, T] bool, True = may attend, among the new tokens (default causal); every
        cached token is visible to every new token. Returns hidden [B, T, C].
        """
        end = self.cfg.num_layers if end is None else end
        bsz, t, _ = hidden.shape
        slot = self._free_slot(cache, start, end, t)
        fast = self._native_for(hidden)
        if fast is not None and hidden.dtype == self.dtype and cache.k.device.type == "cpu":
            if t <= native.MAX_ROWS:
                hidden = fast.run_layers(hidden, positions, cache, slot, start, end, block_mask)
                for i in range(start, end):
                    cache.lengths[i] = slot + t
                return hidden
            if block_mask is None and fast.prefill_rows:  # a causal block (a prefill) in passes of fast rows
                return torch.cat([self.run_layers(hidden[:, i:i + fast.prefill_rows],
                                                  positions[i:i + fast.prefill_rows], cache, start, end)
                                  for i in range(0, t, fast.prefill_rows)], 1)
        mask = None
        causal = slot == 0 and t > 1 and block_mask is None  # a prefill: the kernel's causal path is faster
        if (t > 1 or block_mask is not None) and not causal:
            if block_mask is None:
                block_mask = torch.ones(t, t, dtype=torch.bool, device=hidden.device).tril_()
            mask = torch.cat([torch.ones(t, slot, dtype=torch.bool, device=hidden.device), block_mask], 1)
        cos = self.cos[positions].to(hidden.dtype)  # [T, D]
        sin = self.sin[positions].to(hidden.dtype)
        for i in range(start, end):
            hidden = self._block(self.layers[i], i, hidden, cos, sin, cache, slot, mask, causal)
            cache.lengths[i] = slot + t
        return hidden

    @staticmethod
    def _free_slot(cache: KVCache, start: int, end: int, t: int) -> int:
        """The slot where layers ``start .. end-1`` append a block of ``t`` rows (their common length)."""
        slot = cache.lengths[start]
        if any(cache.lengths[i] != slot for i in range(start, end)):
            raise ValueError(f"layers {start}..{end - 1} hold different cache lengths: {cache.lengths[start:end]}")
        if slot + t > cache.capacity:
            raise ValueError(f"cache overflow: {slot} + {t} tokens > capacity {cache.capacity}")
        return slot

    def run_layers_multi(self, seqs: list[SequenceRows], start: int = 0, end: int | None = None) -> list[Tensor]:
        """Layers ``start .. end-1`` over the new rows of several sequences, each appended to its own cache.

        On the native runtime one pass carries every row (the weights are read once for all) and each row's
        result is bit-identical to the same row in a pass of its sequence alone. Elsewhere (torch, CUDA, a
        cache of another layout, more rows than a native pass takes) each sequence runs its own pass: the
        reference. Returns each sequence's hidden states [T_i, C].
        """
        end = self.cfg.num_layers if end is None else end
        if not seqs:
            return []
        rows = [s.hidden.shape[0] for s in seqs]
        layout = {(s.cache.k.dtype, s.cache.k.stride(), s.cache.capacity, s.cache.k.device.type) for s in seqs}
        fast = self._native_for(seqs[0].hidden[:1]) if sum(rows) <= native.MAX_ROWS else None
        if (fast is None or len(layout) != 1 or next(iter(layout))[3] != "cpu"
                or any(s.hidden.dtype != self.dtype for s in seqs)):
            return [self.run_layers(s.hidden[None], s.positions, s.cache, start, end, s.block_mask)[0] for s in seqs]
        slots = []
        for s in seqs:
            slot = s.cache.lengths[start]
            if any(s.cache.lengths[i] != slot for i in range(start, end)):
                raise ValueError(f"layers {start}..{end - 1} hold different cache lengths: {s.cache.lengths[start:end]}")
            if slot + s.hidden.shape[0] > s.cache.capacity:
                raise ValueError(f"cache overflow: {slot} + {s.hidden.shape[0]} tokens > capacity {s.cache.capacity}")
            slots.append(slot)
        out = fast.run_layers_multi(torch.cat([s.hidden for s in seqs]), torch.cat([s.positions for s in seqs]),
                                    [s.cache for s in seqs], rows, slots, [s.block_mask for s in seqs], start, end)
        for s, slot, t in zip(seqs, slots, rows):
            for i in range(start, end):
                s.cache.lengths[i] = slot + t
        return list(out.split(rows))

    def _block(self, layer: Block, index: int, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache,
               slot: int, mask: Tensor | None, causal: bool) -> Tensor:
        bsz, t, _ = x.shape
        h, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        qkv = linear(layer.qkv, rms_norm(x, layer.attn_norm, layer.eps))
        qk = qkv[..., : (h + hkv) * d].view(bsz, t, h + hkv, d).transpose(1, 2)  # [B, H+Hkv, T, D]
        qk = qk * cos + qk.roll(d // 2, -1) * sin
        q, k = qk[:, :h], qk[:, h:]
        v = qkv[..., (h + hkv) * d:].view(bsz, t, hkv, d).transpose(1, 2)
        cache.k[index, :, :, slot:slot + t] = k
        cache.v[index, :, :, slot:slot + t] = v
        keys = cache.k[index, :, :, : slot + t]
        values = cache.v[index, :, :, : slot + t]
        att = attention(q.to(keys.dtype), keys, values, mask, causal, h != hkv)
        x = x + linear(layer.o, att.transpose(1, 2).reshape(bsz, t, h * d).to(x.dtype))
        gate, up = linear(layer.gate_up, rms_norm(x, layer.mlp_norm, layer.eps)).chunk(2, -1)
        return x + linear(layer.down, F.silu(gate) * up)

    def logits(self, hidden: Tensor, head: Tensor | None = None) -> Tensor:
        """hidden [..., C] -> logits [..., V] through the final norm and LM head (or ``head`` [V', C]).

        The native runtime returns float32 logits (its products accumulate in float32 anyway).
        """
        if (hidden.device.type == "cpu" and not torch.is_grad_enabled() and hidden.dtype == self.dtype
                and hidden.numel() // hidden.shape[-1] <= native.MAX_ROWS and (fast := self.native_runtime())):
            return fast.logits(hidden, head)
        if head is not None:
            return F.linear(rms_norm(hidden, self.norm, self.cfg.rms_norm_eps), head)
        return linear(self.lm_head, rms_norm(hidden, self.norm, self.cfg.rms_norm_eps))

    def greedy(self, ids: Tensor, positions: Tensor, cache: KVCache, block_mask: Tensor | None = None) -> Tensor:
        """ids [1, T] -> the argmax token after each position [T] (a greedy verification pass).

        Same tokens as ``forward(...).argmax(-1)``; the native runtime reduces each row in its head,
        so the decode loop never runs a torch op over [T, V] (whose OpenMP threads would compete with
        the runtime's own).
        """
        return self._greedy(ids, positions, cache, block_mask, hidden=False)[0]

    def greedy_hidden(self, ids: Tensor, positions: Tensor, cache: KVCache, block_mask: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:
        """ids [1, T] -> (the argmax token after each position [T], the last layer's hidden states [T, C]):
        ``run_layers`` then ``argmax``. The native runtime runs it as one call (embedding, layers, head), the
        same bits; elsewhere, and for more rows than a native pass takes, the two steps as they are."""
        return self._greedy(ids, positions, cache, block_mask, hidden=True)

    def greedy_token(self, token: int, position: int, cache: KVCache) -> int:
        """One token at ``position``, appended to ``cache`` -> the argmax after it: ``greedy`` of one row for plain
        greedy decoding, with ints in and out. On the native runtime no tensor is made: each torch call in a
        decoding step costs 10-20 us on the caches the pass has just flushed, and a step made of ``greedy``'s
        tensors spent ~0.3 ms of a 2.6-3.8 ms zoo-l step outside the pass. It returns no tensor, so autograd's
        mode is no reason to leave the runtime; the reference (``greedy``) runs under inference mode."""
        if cache.k.device.type == "cpu" and (fast := self.native_runtime()):
            return self._native_append(cache, 1, lambda slot: fast.greedy_token(token, position, cache, slot))
        with torch.inference_mode():
            device = self.device
            return int(self.greedy(torch.tensor([[token]], device=device), torch.tensor([position], device=device),
                                   cache)[0])

    def _greedy(self, ids: Tensor, positions: Tensor, cache: KVCache, block_mask: Tensor | None,
                hidden: bool) -> tuple[Tensor, Tensor | None]:
        t = ids.shape[-1]
        fast = self._native_for(ids) if t <= native.MAX_ROWS and cache.k.device.type == "cpu" else None
        if fast is None:
            states = self.run_layers(self.embed_tokens(ids), positions, cache, block_mask=block_mask)[0]
            return self.argmax(states), states
        return self._native_append(cache, t, lambda slot: fast.greedy(ids, positions, cache, slot, block_mask, hidden))

    def _native_append(self, cache: KVCache, t: int, run: Callable[[int], _R]) -> _R:
        """``run(slot)``: a native pass through every layer that appends ``t`` rows to ``cache`` at ``slot``, their
        common length; the lengths then count the rows, also where the head refused non-finite logits (the
        layers had written the rows' keys and values by then)."""
        layers = self.cfg.num_layers
        slot = self._free_slot(cache, 0, layers, t)
        try:
            out = run(slot)
        except CheckpointError:
            cache.lengths[:layers] = [slot + t] * layers
            raise
        cache.lengths[:layers] = [slot + t] * layers
        return out

    def argmax(self, hidden: Tensor) -> Tensor:
        """hidden [T, C] (last layer's) -> the argmax token of each row [T]; non-finite logits are refused."""
        if (hidden.device.type == "cpu" and not torch.is_grad_enabled() and hidden.shape[0] <= native.MAX_ROWS
                and (fast := self.native_runtime())):
            return fast.argmax(hidden)  # refuses non-finite logits itself
        logits = self.logits(hidden)
        check_finite_logits(logits, "model")
        return logits.argmax(-1)

    def top1(self, hidden: Tensor, head: Tensor | None = None) -> tuple[int, float]:
        """hidden [C] -> (argmax token, its softmax probability) through the final norm and LM head.

        ``head`` [V', C] replaces the LM head (a draft's vocabulary subset; the token indexes it). The
        native runtime answers without building the logits in Python: greedy drafting's hot path.
        """
        if (hidden.device.type == "cpu" and not torch.is_grad_enabled() and hidden.dtype == self.dtype
                and (fast := self.native_runtime())):
            return fast.top1(hidden, head)
        if head is None:
            logits = self.logits(hidden)
        else:
            logits = F.linear(rms_norm(hidden, self.norm, self.cfg.rms_norm_eps), head)
        probs = logits.float().reshape(-1).softmax(-1)
        token = int(probs.argmax())
        return token, float(probs[token])

    def forward(self, ids: Tensor, positions: Tensor, cache: KVCache, block_mask: Tensor | None = None,
                logits_at: Tensor | slice | None = slice(None)) -> Tensor | None:
        """ids [B, T] -> logits [B, len(logits_at), V] (None when ``logits_at`` is None)."""
        hidden = self.run_layers(self.embed_tokens(ids), positions, cache, block_mask=block_mask)
        if logits_at is None:
            return None
        return self.logits(hidden[:, logits_at])
