from __future__ import annotations

from pathlib import Path

import pytest

from s2d.model.tiny import write_random_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints written by transformers; all share the byte tokenizer."""
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "target": write_random_checkpoint(root / "target", num_layers=3, seed=1),
        "draft": write_random_checkpoint(root / "draft", hidden_size=32, num_layers=1, num_heads=2,
                                         num_kv_heads=1, intermediate_size=64, seed=2),
    }
