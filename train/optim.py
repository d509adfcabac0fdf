"""Optimizer and learning-rate schedule, built with timm's factories."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from slimforge.train.config import at_least


@dataclass
class OptimConfig:
    """Optimizer and schedule. The schedule steps once per optimizer update."""

    name: str = "adamw"
    """Any optimizer name timm's ``create_optimizer_v2`` knows (adamw, sgd, lamb, ...)."""
    lr: float = 2e-3
    """Peak learning rate at ``reference_batch`` images per update (see ``lr_scaling``)."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """How the peak LR follows the global batch (micro-batch × processes × accumulation): none keeps ``lr``;
    linear uses ``lr × global / reference_batch`` (Goyal et al. 2017, SGD); sqrt uses
    ``lr × sqrt(global / reference_batch)`` (common for Adam-family optimizers)."""
    reference_batch: int = 64
    """The global batch ``lr`` was tuned for."""
    weight_decay: float = 0.05
    momentum: float = 0.9
    """SGD-family momentum."""
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    """Linear warm-up from lr/100 over this many optimizer steps."""
    min_lr: float = 1e-5
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; null disables."""

    def validate(self) -> list[str]:
        p = []
        if self.lr <= 0:
            p.append(f"lr: {self.lr} must be > 0")
        p += at_least(self, 0, "weight_decay", "warmup_steps")
        p += at_least(self, 1, "reference_batch")
        if self.lr > 0 and not 0 <= self.min_lr <= self.lr:
            p.append(f"min_lr: {self.min_lr} must be in [0, lr]")
        if self.grad_clip is not None and self.grad_clip <= 0:
            p.append(f"grad_clip: {self.grad_clip} must be > 0 or null")
        try:
            from timm.optim import list_optimizers

            if self.name.lower() not in list_optimizers():
                p.append(f"name: timm has no optimizer {self.name!r} (e.g. adamw, sgd, lamb)")
        except ImportError:  # older timm: create_optimizer_v2 will complain instead
            pass
        return p


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The peak LR for ``global_batch`` images per optimizer update under ``cfg.lr_scaling``."""
    ratio = global_batch / cfg.reference_batch
    return cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer over the model's trainable parameters (no weight decay on norms and biases)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt=cfg.name, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, lr: float):
    """Per-update LR schedule: linear warm-up from lr/100, then cosine to ``min_lr`` (or constant).

    Stepped by the engine once per optimizer update, not handed to ``accelerator.prepare`` (Accelerate
    would step it once per process per update).
    """
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    floor = min(cfg.min_lr / lr, 1.0)

    def factor(step: int) -> float:
        if step < warmup:
            return 0.01 + 0.99 * step / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
