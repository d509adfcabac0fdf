"""Bare models from a config section: built from a model name, or rebuilt from a slimforge checkpoint."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from slimforge.train.errors import ModelError
from slimforge.train.models import (
    ModelConfig,
    ModelSpec,
    build_model,
    check_class_names,
    check_input,
    resolve_num_classes,
)

logger = logging.getLogger(__name__)


def described_teacher(cfg: ModelConfig, class_names: list[str]) -> ModelSpec:
    """The teacher checkpoint's recorded spec, without loading its weights (a cached teacher does not run), checked
    against the dataset's class names.

    Raises:
        CheckpointError / ModelError: no readable checkpoint, or other classes.
    """
    from slimforge.train.checkpoint import read_meta, spec_from_meta

    if cfg.checkpoint is None:
        raise ModelError("a cached teacher needs teacher.checkpoint", "set teacher.checkpoint=<teacher run>/checkpoint")
    spec = spec_from_meta(read_meta(cfg.checkpoint), f"teacher checkpoint {cfg.checkpoint}")
    check_class_names(
        spec.class_names,
        class_names,
        f"teacher checkpoint {cfg.checkpoint}",
        ("checkpoint", "dataset"),
        "use the dataset the teacher was trained on, with the same classes in the same order",
    )
    return spec


def load_or_build(
    cfg: ModelConfig,
    role: str,
    num_classes: int,
    input_size: list[int],
    data_info: dict[str, Any],
    class_names: list[str],
) -> tuple[nn.Module, ModelSpec]:
    """A bare model in train mode and its spec: from ``cfg.checkpoint`` (architecture, recipe and weights) or from
    ``cfg.name``, checked against the dataset it will be trained or evaluated on: class count, class names and their
    order, input channels. A checkpoint of a user-factory model loads only with ``cfg.allow_factory``.

    Args:
        cfg: The ``model`` or ``teacher`` section.
        role: ``"model"`` or ``"teacher"``, for messages.
        num_classes: The dataset's class count.
        input_size: ``[C, H, W]`` the data loader produces.
        data_info: The data's normalisation (:func:`slimforge.train.data.describe`).
        class_names: The dataset's class names.

    Raises:
        ModelError / CheckpointError: the model cannot be built, does not fit the data, or is a user-factory
            checkpoint without ``allow_factory``.
    """
    from slimforge.train.checkpoint import load_checkpoint

    resolve_num_classes(cfg, num_classes, role)
    if cfg.checkpoint is None:
        return build_model(cfg, num_classes, input_size, data_info, class_names)
    opt_in = f"set {role}.allow_factory=true"
    model, spec, _ = load_checkpoint(cfg.checkpoint, allow_factory=cfg.allow_factory, opt_in=opt_in)
    if cfg.name is not None and (cfg.name != spec.name or cfg.source != spec.source):
        raise ModelError(
            f"{role}.name is {cfg.source} {cfg.name!r} but {cfg.checkpoint} holds {spec.source} {spec.name!r}",
            f"remove {role}.name (the checkpoint says what it holds) or point {role}.checkpoint elsewhere",
        )
    if spec.num_classes != num_classes:
        raise ModelError(
            f"{role} checkpoint {cfg.checkpoint} has {spec.num_classes} classes but the dataset has {num_classes}",
            "distil on the dataset the teacher was trained on, or train a teacher for this dataset first",
        )
    check_class_names(
        spec.class_names,
        class_names,
        f"{role} checkpoint {cfg.checkpoint}",
        ("checkpoint", "dataset"),
        "use the dataset the checkpoint was trained on, with the same classes in the same order (an image folder's "
        f"classes are its subfolder names, sorted), or train {'a teacher' if role == 'teacher' else 'it'} on this data",
    )
    spec.class_names = spec.class_names or list(class_names)  # an older checkpoint's model records the data's
    if role == "teacher":
        # A teacher keeps the input it was trained on: the task converts each batch to it (slimforge.train.teacher).
        check_input(model, spec)
        return model.train(), spec
    if spec.in_chans != input_size[0]:
        raise ModelError(
            f"{role} checkpoint {cfg.checkpoint} takes {spec.in_chans}-channel images, data.in_chans is "
            f"{input_size[0]}",
            f"set data.in_chans={spec.in_chans}",
        )
    if spec.mean and (list(spec.mean) != list(data_info["mean"]) or list(spec.std) != list(data_info["std"])):
        logger.warning(
            "%s was trained with mean/std %s/%s, the data uses %s/%s",
            role,
            spec.mean,
            spec.std,
            data_info["mean"],
            data_info["std"],
        )
    spec.input_size = list(input_size)
    check_input(model, spec)
    return model.train(), spec
