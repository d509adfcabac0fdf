"""Validation accuracy and loss over a sharded loader, identical on every rank."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator) -> dict[str, float]:
    """Top-1 accuracy and cross-entropy over the whole (sharded) validation loader, identical on all ranks."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = 0
    for batch in loader:
        with accelerator.autocast():
            logits = model(batch["pixel_values"])
        if isinstance(logits, (tuple, list)):  # a student with a task's adapters also returns their features
            logits = logits[0]
        # gather_for_metrics drops the samples Accelerate duplicated to even out the last batch.
        logits, labels = accelerator.gather_for_metrics((logits.float(), batch["label"]))
        correct += (logits.argmax(-1) == labels).sum()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        count += labels.numel()
    model.train(was_training)
    return {"acc": (correct / max(count, 1)).item(), "loss": (loss_sum / max(count, 1)).item(), "n": count}
