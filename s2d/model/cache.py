"""Static, preallocated KV cache. Rollback is a length change; compaction is one gather."""

from __future__ import annotations

import functools
import math
import mmap

import torch
from torch import Tensor


class KVCache:
    """Keys and values of one batch of sequences for ``num_layers`` layers.

    Each layer keeps its own filled length: a sorted draft's deeper layers lag behind its shallow
    ones for tokens that left at an early exit, until they are caught up.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        self.k = lazy_zeros(shape, dtype, device)
        self.v = lazy_zeros(shape, dtype, device)
        self.lengths = [0] * num_layers
        self.capacity = capacity

    @functools.cached_property
    def native_layout(self) -> tuple[int, int, int, int, int, int]:
        """(keys' address, values' address, 1 if bfloat16, elements between layers, between KV heads, slots
        per head): how the native runtime reads this cache (``k`` and ``v`` are fixed for its life)."""
        k = self.k
        return (k.data_ptr(), self.v.data_ptr(), int(k.dtype == torch.bfloat16), k.stride(0), k.stride(2),
                k.shape[3])

    def __getstate__(self) -> dict:
        """A copy's layout is its own: a deep copy (or a pickle) holds new tensors, at other addresses."""
        state = dict(self.__dict__)
        state.pop("native_layout", None)
        return state

    @property
    def length(self) -> int:
        """Tokens every layer holds (the committed prefix)."""
        return min(self.lengths)

    def truncate(self, length: int) -> None:
        """Forget every slot at or beyond ``length`` (stale slots are simply overwritten later)."""
        self.lengths = [min(n, length) for n in self.lengths]

    def compact(self, start: int, keep: Tensor) -> None:
        """Move slots ``keep`` [n] (ascending, all >= start) to ``start .. start+n`` in every layer.

        Used after a tree pass: the accepted path's entries become the contiguous prefix.
        """
        n = keep.numel()
        idx = keep.to(self.k.device)
        self.k[:, :, :, start:start + n] = self.k.index_select(3, idx)
        self.v[:, :, :, start:start + n] = self.v.index_select(3, idx)
        self.lengths = [start + n] * len(self.lengths)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A zero tensor whose CPU memory is taken from the OS only where it is first written.

    A cache holds the model's whole context (zoo-l: 56 MB a sequence) and a sequence fills a fraction of it;
    ``torch.zeros`` writes every page at once (a server's 32 slots: 1.5 s of page faults on their first
    requests, and all their memory resident). An anonymous mapping reads as zeros and gets a page on its first
    write, so what the kernels may read past a sequence's length (AMX P.V reads whole blocks of 32 values,
    weighted 0) is still zeros, never garbage that 0 x NaN would spread."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    # the tensor holds the mapping (frombuffer keeps its buffer alive); it is unmapped with the tensor
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)
