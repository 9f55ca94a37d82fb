"""What a draft token costs relative to a target pass, estimated from the bytes each reads.

On CPUs (and GPUs at batch 1) a decoding pass reads every weight it uses once, so its time is close
to its bytes over the memory bandwidth, plus a fixed cost per call (Python, dispatch), expressed
here in bytes at ~40 GB/s: ~80 us per draft token, ~200 us per target pass. A deterministic
estimate: no timing. How it compares with measured costs on the zoo: benchmarks/RESULTS.md,
"Measurements behind the code".
"""

from __future__ import annotations

from s2d.model.llama import Transformer


def weight_bytes(model: Transformer, layers: int | None = None, head_rows: int | None = None) -> int:
    """Bytes read by a one-token pass through the first ``layers`` layers and the head (``head_rows``
    of it: a vocabulary subset)."""
    n = model.cfg.num_layers if layers is None else layers
    size = model.embed.weight.element_size()
    per_layer = sum(p.numel() for p in model.layers[0].parameters()) if n else 0
    rows = model.cfg.vocab_size if head_rows is None else head_rows
    head = rows * model.cfg.hidden_size + model.norm.numel()
    return size * (n * per_layer + head)


DRAFT_TOKEN_OVERHEAD = 3_200_000  # bytes: ~80 us at ~40 GB/s
PASS_OVERHEAD = 8_000_000  # bytes: ~200 us


def draft_cost_ratio(draft: Transformer, exit_layers: int, target: Transformer, head_rows: int | None = None) -> float:
    return ((weight_bytes(draft, exit_layers, head_rows) + DRAFT_TOKEN_OVERHEAD)
            / (weight_bytes(target) + PASS_OVERHEAD))
