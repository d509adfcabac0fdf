"""The run config both entries read: one section per component, each validated by its own dataclass.

Example:
    >>> from train.config import load_config
    >>> from train.schema import RunConfig
    >>> cfg = load_config(RunConfig, "configs/debug/tiny_distill.yaml", ["train.epochs=1"])
    >>> cfg.train.epochs
    1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from train.data import DataConfig
from train.engine import TrainConfig
from train.losses import LossConfig
from train.models import ModelConfig
from train.optim import OptimConfig


@dataclass
class RunConfig:
    """A training or distillation run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model being trained (the student, under distill.py)."""
    teacher: ModelConfig | None = None
    """distill.py only: the frozen teacher, usually ``{checkpoint: runs/teacher/checkpoint}``."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compress: list[dict[str, Any]] = field(default_factory=list)
    """Compression recipe applied to the bare student before training: ``[{method: ..., ...}]``."""

    def validate(self) -> list[str]:
        from compress.api import check_recipe

        return [f"compress.{p}" for p in check_recipe(self.compress)]
