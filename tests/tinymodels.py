"""Models built in memory for tests that enumerate distributions (no checkpoint on disk)."""

from __future__ import annotations

import torch

from s2d.model.config import ModelConfig
from s2d.model.llama import Transformer


def small_vocab_model(layers: int, seed: int, exits: tuple[int, ...] = (), head_scale: float = 6.0) -> Transformer:
    """A random model over 8 tokens; ``head_scale`` sharpens its distributions (peaked, not uniform)."""
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=8, hidden_size=32, intermediate_size=64, num_layers=layers,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_positions=32, exits=exits)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model.eval().requires_grad_(False)
