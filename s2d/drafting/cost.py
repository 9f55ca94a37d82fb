"""What a draft token costs relative to a target pass, estimated from the bytes each reads.

On CPUs (and GPUs at batch 1) a decoding pass reads every weight it uses once, so its time is close
to its bytes over the memory bandwidth: a deterministic estimate needs no timing. Measured on the
zoo (benchmarks/costs.py, AMX Xeon): exit 1 of the zoo draft over a zoo-l/-m/-s one-token pass is
0.10/0.21/0.55; these bytes give 0.09/0.16/0.49.
"""

from __future__ import annotations

from s2d.model.llama import Transformer


def weight_bytes(model: Transformer, layers: int | None = None) -> int:
    """Bytes read by a one-token pass through the first ``layers`` layers and the head."""
    n = model.cfg.num_layers if layers is None else layers
    size = model.embed.weight.element_size()
    per_layer = sum(p.numel() for p in model.layers[0].parameters()) if n else 0
    head = model.lm_head.weight.numel() + model.norm.numel()
    return size * (n * per_layer + head)


def draft_cost_ratio(draft: Transformer, exit_layers: int, target: Transformer) -> float:
    return weight_bytes(draft, exit_layers) / weight_bytes(target)
