"""Validation accuracy and loss over a sharded loader, identical on every rank, of images each model gets through
its own preprocessing (:func:`data_for_model`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from slimforge.train.data import DataConfig
    from slimforge.train.models import ModelConfig


def data_for_model(data: DataConfig, model: ModelConfig) -> DataConfig:
    """The data config that feeds ``model`` (a ``ModelConfig``): ``data``'s preprocessing fields where set, else the
    model's own (:func:`slimforge.train.views.resolve_preprocessing`), concrete in every field.

    The model's own is what its checkpoint recorded (``model.checkpoint``) or, for a timm model with pretrained
    weights, its ``pretrained_cfg`` (the weights were trained and are evaluated that way). A randomly initialised
    model has nothing of its own: it learns whatever the data's defaults feed it.
    """
    from slimforge.train.views import own_preprocessing, resolve_preprocessing, spec_preprocessing

    own = None
    if model.checkpoint is not None:
        from slimforge.train.checkpoint import read_spec

        own = spec_preprocessing(read_spec(model.checkpoint))
    elif model.pretrained and model.source == "timm" and model.name:
        import timm

        if timm.is_model(model.name):  # an unknown name is reported when the model is built
            with torch.device("meta"):  # no weights, no memory: only its pretrained_cfg is read
                own = own_preprocessing(timm.create_model(model.name, pretrained=False, **model.kwargs))
    return resolve_preprocessing(data, own)


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
