"""Static, preallocated KV cache. Rollback is a length change; compaction is one gather."""

from __future__ import annotations

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
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * num_layers
        self.capacity = capacity

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
