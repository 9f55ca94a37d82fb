"""The targets as teachers: full-vocabulary distributions from s2d's fast inference runtime."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from s2d.model.cache import KVCache
from s2d.model.config import CheckpointError
from s2d.model.llama import Transformer
from s2d.model.loading import check_same_tokenizer, load_model, load_tokenizer


def check_tokenizers(tokenizer, targets: tuple[Path, ...], name: str = "the draft") -> None:
    """Every target must tokenize like the draft: distillation compares distributions id by id."""
    for path in targets:
        check_same_tokenizer(load_tokenizer(path), tokenizer, target_name=f"target {path}", draft_name=name)


class Teachers:
    def __init__(self, paths: tuple[Path, ...], dtype: str, device: str, vocab_size: int, seq_len: int) -> None:
        self.paths = paths
        self.models: list[Transformer] = [load_model(p, dtype=dtype, device=device) for p in paths]
        for path, model in zip(paths, self.models):
            if model.cfg.vocab_size != vocab_size:
                raise CheckpointError(f"target {path} has vocab_size {model.cfg.vocab_size}, the draft {vocab_size}")
            if model.cfg.max_positions < seq_len:
                raise ValueError(f"seq_len {seq_len} exceeds target {path}'s context of {model.cfg.max_positions}")
        self._caches: dict[tuple[int, int, int], KVCache] = {}  # reused: allocating them costs real time

    def _cache(self, i: int, bsz: int, length: int) -> KVCache:
        key = (i, bsz, length)
        if key not in self._caches:
            self._caches[key] = self.models[i].new_cache(batch=bsz, capacity=length)
        cache = self._caches[key]
        cache.truncate(0)
        return cache

    @torch.no_grad()  # not inference_mode: its tensors could not be saved for the draft's backward
    def logits(self, ids: Tensor) -> list[Tensor]:
        """ids [B, T] -> per target logits [B * T, V] (the teachers' dtype)."""
        bsz, length = ids.shape
        positions = torch.arange(length, device=ids.device)
        out = []
        for i, model in enumerate(self.models):
            logits = model(ids, positions, self._cache(i, bsz, length))  # [B, T, V]
            out.append(logits.reshape(bsz * length, -1))
        return out
