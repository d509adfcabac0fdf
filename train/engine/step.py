"""One training micro-step: forward under autocast, backward, and on the micro-batch that completes an update,
clipping and the optimizer step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def train_step(
    accelerator, model: nn.Module, task, optimizer, batch: dict[str, Any], grad_clip: float | None
) -> dict[str, torch.Tensor]:
    """Runs one micro-batch through ``task`` and, when Accelerate says the accumulation window is complete,
    applies the update.

    Args:
        accelerator: The run's ``Accelerator``.
        model: The prepared (wrapped) student.
        task: ``task(model, images, labels) -> {"loss", ...}`` (:mod:`slimforge.train.task`).
        optimizer: The prepared optimizer; Accelerate's wrapper skips ``step`` on accumulation micro-steps.
        batch: ``{"pixel_values": [B, C, H, W], "label": [B], ...}``.
        grad_clip: Global gradient-norm limit, or None.

    Returns:
        The task's losses (scalars, still on the device: reading them is a sync point).
    """
    with accelerator.accumulate(model):
        with accelerator.autocast():
            losses = task(model, batch["pixel_values"], batch["label"])
        accelerator.backward(losses["loss"])
        if accelerator.sync_gradients and grad_clip is not None:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses
