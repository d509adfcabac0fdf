"""Validation images of a checkpoint's dataset, as tensors: the one source of images for parity and benchmarks.

A training checkpoint records the :class:`~slimforge.train.data.DataConfig` it was trained on
(``meta["extra"]["data"]``), so export and benchmark load *real* validation images without the training config.
Each model gets the images through its own eval transform (input size, channels and normalisation from its
:class:`ModelSpec`), while the sample order is shared, so a student and its teacher are compared image by image.

Example:
    >>> from slimforge.train.checkpoint import load_checkpoint
    >>> from slimforge.export.evaldata import ValidationSet, data_config_from_meta
    >>> model, spec, meta = load_checkpoint("runs/teacher/checkpoint")  # doctest: +SKIP
    >>> val = ValidationSet(data_config_from_meta(meta), max_images=256)  # doctest: +SKIP
    >>> val.images_for(spec).shape  # doctest: +SKIP
    torch.Size([256, 1, 32, 32])
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
from typing import Any

import torch

from slimforge.train.config import apply_overrides, from_dict
from slimforge.train.data import DataConfig, Splits, load_splits, with_transform
from slimforge.train.errors import DataError
from slimforge.train.models import ModelSpec
from slimforge.train.sampling import class_coverage, stratified_indices

logger = logging.getLogger(__name__)

# Images are transformed in chunks of this many: bounds the PIL objects alive at once.
_CHUNK = 256


def data_config_from_meta(meta: dict[str, Any], overrides: list[str] | None = None, where: str = "") -> DataConfig:
    """The dataset a checkpoint was trained on, with ``key=value`` overrides applied.

    Args:
        meta: A checkpoint's metadata (``read_meta``) or an export's ``model.json``.
        overrides: ``key=value`` strings for :class:`DataConfig` fields, e.g. ``["source=embedded", "name=digits"]``.
        where: The checkpoint path, for error messages.

    Raises:
        DataError: the checkpoint does not record its dataset and no overrides describe one.
        ConfigError: the recorded data or an override is invalid.
    """
    recorded = (meta.get("extra") or {}).get("data")
    if recorded is None and not overrides:
        raise DataError(
            f"checkpoint {where or '(unknown)'} does not record the dataset it was trained on (meta extra.data)",
            "describe the validation data with --data key=value ..., e.g. --data source=embedded name=mnist_5k "
            "in_chans=1 image_size=32",
        )
    data = copy.deepcopy(recorded or {})
    apply_overrides(data, list(overrides or []))
    return from_dict(DataConfig, data)


@functools.lru_cache(maxsize=4)
def _splits(cfg_json: str) -> Splits:
    # Keyed by the config's JSON: parity and the benchmark of one process reuse one decoded dataset.
    return load_splits(from_dict(DataConfig, json.loads(cfg_json)))


class ValidationSet:
    """The validation samples of a dataset, or a seeded class-stratified sample of ``max_images`` of them,
    transformed per model on demand.

    Args:
        cfg: The dataset (usually :func:`data_config_from_meta`).
        max_images: Keep N samples, every class in turn (:func:`slimforge.train.sampling.stratified_indices` with
            ``data.seed``): the same images in every process; ``None`` keeps all.
        split: ``"val"``, or ``"train"`` for images held apart from the checks (int8 calibration); both get the
            eval transform.
    """

    def __init__(self, cfg: DataConfig, max_images: int | None = None, split: str = "val") -> None:
        if max_images is not None and max_images < 1:
            raise DataError(f"max_images is {max_images}", "pass --max-images >= 1")
        if split not in ("val", "train"):
            raise ValueError(f"split must be 'val' or 'train', got {split!r}")
        self.cfg = cfg
        splits = _splits(json.dumps(dataclasses.asdict(cfg), sort_keys=True))
        samples = getattr(splits, split)
        n = len(samples) if max_images is None else min(max_images, len(samples))
        if n == 0:
            raise DataError(f"the dataset's {split} split is empty", f"use a dataset with {split} images")
        self.sampled = n < len(samples)
        """Whether these are a stratified sample of the split rather than all of it."""
        self.split = samples.select(stratified_indices(samples["label"], n, cfg.seed)) if self.sampled else samples
        self.class_names = list(splits.class_names)
        self.labels = torch.tensor(self.split["label"], dtype=torch.long)  # [N]
        self.coverage = class_coverage(self.labels.numpy()) + (f", sampled from {len(samples)}" if self.sampled else "")
        """``"N images of K classes"``, for the reports."""
        self._cache: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def config_for(self, spec: ModelSpec) -> DataConfig:
        """The eval-time data config that feeds ``spec``'s input size, channels and normalisation."""
        c, h, w = spec.input_size
        if h != w:
            raise DataError(f"model {spec.name} takes {h}x{w} images; slimforge data is square", "use square inputs")
        return dataclasses.replace(
            self.cfg,
            image_size=h,
            in_chans=c,
            mean=list(spec.mean) or None,
            std=list(spec.std) or None,
            interpolation=spec.interpolation or self.cfg.interpolation,
        )

    def images_for(self, spec: ModelSpec) -> torch.Tensor:
        """All images, preprocessed the way ``spec`` was trained.

        Returns:
            ``[N, C, H, W]`` float32, normalised.

        Raises:
            DataError: the model's classes do not match the dataset's.
        """
        if spec.num_classes != len(self.class_names):
            raise DataError(
                f"model {spec.name} has {spec.num_classes} classes, the validation data has {len(self.class_names)}",
                "evaluate on the dataset the model was trained on (--data key=value overrides)",
            )
        cfg = self.config_for(spec)
        key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
        if key not in self._cache:
            ds = with_transform(self.split, cfg, is_training=False)
            chunks = [torch.stack(ds[i : i + _CHUNK]["pixel_values"]) for i in range(0, len(ds), _CHUNK)]
            self._cache[key] = torch.cat(chunks).float().contiguous()
            logger.debug("prepared %d validation images %s", len(ds), list(self._cache[key].shape[1:]))
        return self._cache[key]
