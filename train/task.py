"""Training tasks: given the (wrapped) student and a batch, return a dict of losses.

As in timm's ``timm/task/distillation.py``, the teacher lives in the task, not in the model Accelerate wraps:
it is never handed to ``accelerator.prepare``, so it gets no DDP/DeepSpeed wrapper, no gradient all-reduce, no
optimizer state and no place in the student's checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.train.losses import LossConfig, distillation_loss


class SupervisedTask:
    """Cross-entropy on the labels."""

    def __init__(self, loss: LossConfig) -> None:
        self.cfg = loss

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: images ``[B, C, H, W]``, labels ``[B]``. Returns ``{"loss", "ce", "logits"}``."""
        logits = model(images)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        return {"loss": ce, "ce": ce, "logits": logits.detach()}


class DistillationTask:
    """Logit distillation from a frozen teacher (see :mod:`slimforge.train.losses` for the formula and alpha)."""

    def __init__(self, teacher: nn.Module, loss: LossConfig) -> None:
        self.teacher = freeze_(teacher)
        self.cfg = loss

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: images ``[B, C, H, W]``, labels ``[B]``. Returns ``{"loss", "kd", "ce", "logits"}``."""
        # no_grad, not inference_mode: the teacher's logits are saved by the KL backward, and inference
        # tensors cannot be saved for backward.
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        logits = model(images)
        out = distillation_loss(logits, teacher_logits, labels, self.cfg)
        out["logits"] = logits.detach()
        return out


def freeze_(model: nn.Module) -> nn.Module:
    """Puts ``model`` in eval mode (BatchNorm uses running stats, dropout off) and stops its gradients."""
    model.eval()
    model.requires_grad_(False)
    return model
