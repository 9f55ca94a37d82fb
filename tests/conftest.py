from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from threads, and OpenMP threads spinning against another process's on a
# small machine slow everything down many times over.
torch.set_num_threads(1)

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
