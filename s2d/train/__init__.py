"""Training sorted drafts: SoFT (mean next-token CE over exits) and multi-target distillation.

Stages, one module each: ``data`` (documents -> packed token rows), ``losses`` (SoFT CE and the
divergences), ``draft`` (the trainable multi-exit model), ``teachers`` (targets' distributions),
``checkpoint`` (atomic save / resume), ``trainer`` (the loop, DDP), ``export`` (plain checkpoints).

    from s2d.train import DataConfig, TrainConfig, train_draft
    cfg = TrainConfig(out_dir="runs/draft", data=DataConfig(paths=("src/",)), exits=(1, 2, 3),
                      init="path/to/small-target")
    train_draft(cfg)
"""

from s2d.train.config import DraftShape, TrainConfig
from s2d.train.data import DataConfig
from s2d.train.export import export_exit
from s2d.train.losses import DivergenceSpec
from s2d.train.trainer import TrainResult, train_draft

__all__ = ["DataConfig", "DivergenceSpec", "DraftShape", "TrainConfig", "TrainResult", "export_exit", "train_draft"]
