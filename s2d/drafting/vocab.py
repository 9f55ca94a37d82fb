"""A draft head over the most frequent tokens only (FR-Spec): a cheaper draft token, still lossless.

A draft token pays the vocabulary head (on the zoo draft, 8192 x 384: more than its first layer).
Scoring only the N tokens that are most frequent in the draft's training text makes the head N/V as
dear, at the price of never proposing a rarer token; verification keeps the target's full head, so
outputs are unchanged (greedy) or exactly distributed (sampling: q is zero outside the subset,
which rejection sampling handles). On the zoo's training text the top 2048 tokens cover 88%, the
top 4096 95%.

Stored beside the draft as ``s2d_draft_vocab.json``: ``{"tokens": [ids, most frequent first], ...}``,
written by ``s2d train-draft --objective vocab``; ``DraftOptions.draft_vocab`` picks how many to use.
"""

from __future__ import annotations

import json
import weakref
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

VOCAB_FILE = "s2d_draft_vocab.json"


def rank_tokens(stream: Tensor, vocab_size: int) -> list[int]:
    """Token ids by frequency in ``stream`` [N], most frequent first (ties: lower id); unseen ones last."""
    counts = Counter(stream.tolist())
    seen = sorted(counts, key=lambda t: (-counts[t], t))
    rest = [t for t in range(vocab_size) if t not in counts]
    return [t for t in seen if 0 <= t < vocab_size] + rest


def save_vocab(directory: Path, ranked: list[int], meta: dict) -> Path:
    path = Path(directory) / VOCAB_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"tokens": ranked, **meta}) + "\n")
    tmp.replace(path)
    return path


def load_vocab(directory: Path | None, vocab_size: int) -> list[int] | None:
    """The ranked ids stored beside a draft, or None; a malformed file is a CheckpointError naming it."""
    if directory is None or not (Path(directory) / VOCAB_FILE).exists():
        return None
    from s2d.side_files import read_json, side_file

    path = Path(directory) / VOCAB_FILE
    with side_file(path, "draft vocabulary", "rewrite it with `s2d train-draft --objective vocab`"):
        tokens = read_json(path)["tokens"]
        if (not isinstance(tokens, list) or len(set(tokens)) != len(tokens)
                or not all(type(t) is int and 0 <= t < vocab_size for t in tokens)):
            raise ValueError(f"'tokens' must be distinct token ids in [0, {vocab_size})")
        return tokens


# model -> (ids, the head's weight storage and version) -> (head, index): one copy per subset and model, shared by
# every drafter of it, so that a batch's head calls over the same subset run as one (batch.py groups them by head)
_SUBSETS: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, tuple[Tensor, Tensor]]] = weakref.WeakKeyDictionary()


def subset_head(model, ids: list[int]) -> tuple[Tensor, Tensor]:
    """(head [N, C] with the rows of ``ids``, ids [N] long): the draft's LM head over a vocabulary subset."""
    weight = model.lm_head.weight
    # the weight's storage and version in the key: a model moved, cast or trained since gets a fresh copy
    version = 0 if weight.is_inference() else weight._version  # inference tensors keep no version (nor train)
    key = (tuple(ids), weight.data_ptr(), version, weight.dtype, weight.device)
    per_model = _SUBSETS.setdefault(model, {})
    if key not in per_model:
        index = torch.tensor(ids, dtype=torch.long, device=model.device)
        for stale in [k for k in per_model if k[1:] != key[1:]]:  # copies of weights that have changed since
            del per_model[stale]
        per_model[key] = (weight.detach().index_select(0, index).contiguous(), index)
    return per_model[key]
