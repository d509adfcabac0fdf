"""Validation images of a checkpoint's dataset, as tensors: the one source of images for parity and benchmarks.

A training checkpoint records the :class:`~slimforge.train.data.DataConfig` it was trained on
(``meta["extra"]["data"]``), so export and benchmark load *real* validation images without the training config.
Each model gets the images through its own eval transform (input size, channels, crop, interpolation and
normalisation its :class:`ModelSpec` recorded), while the sample order is shared, so a student and its teacher are
compared image by image. :meth:`ValidationSet.batches` streams them batch by batch (the whole ImageNet validation
split at 224 px would be 30 GB of floats); :meth:`ValidationSet.images_for` holds them all (parity checks, samples).

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
from collections.abc import Iterator
from typing import Any

import torch

from slimforge.train.config import apply_overrides, from_dict
from slimforge.train.data import DataConfig, Splits, load_splits, with_transform
from slimforge.train.errors import DataError
from slimforge.train.models import ModelSpec
from slimforge.train.sampling import class_coverage, stratified_indices
from slimforge.train.views import resolve_preprocessing, spec_preprocessing

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
        self.max_images = max_images
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
        """The eval-time data config that feeds ``spec`` as it recorded: input size, channels, interpolation,
        normalisation, crop (:func:`slimforge.train.views.spec_preprocessing`); the data's defaults where it
        recorded none."""
        c, h, w = spec.input_size
        if h != w:
            raise DataError(f"model {spec.name} takes {h}x{w} images; slimforge data is square", "use square inputs")
        own = spec_preprocessing(spec)
        fields = {k: v for k, v in own.items() if k != "input_size" and v is not None}
        return resolve_preprocessing(dataclasses.replace(self.cfg, **fields, image_size=h, in_chans=c))

    def _check(self, spec: ModelSpec) -> DataConfig:
        if spec.num_classes != len(self.class_names):
            raise DataError(
                f"model {spec.name} has {spec.num_classes} classes, the validation data has {len(self.class_names)}",
                "evaluate on the dataset the model was trained on (--data key=value overrides)",
            )
        return self.config_for(spec)

    def batches(self, spec: ModelSpec, batch_size: int, limit: int | None = None) -> Iterator[torch.Tensor]:
        """The images in order, preprocessed the way ``spec`` recorded, ``batch_size`` at a time: only one batch is
        held, however large the split.

        Args:
            spec: The model the images are for.
            batch_size: Images per batch (the last one may be smaller).
            limit: Stop after this many images; ``None``: all of them.

        Yields:
            ``[B, C, H, W]`` float32, normalised.

        Raises:
            DataError: the model's classes do not match the dataset's.
        """
        ds = with_transform(self.split, self._check(spec), is_training=False)
        n = len(ds) if limit is None else min(limit, len(ds))
        for i in range(0, n, batch_size):
            yield torch.stack(ds[i : min(i + batch_size, n)]["pixel_values"]).float().contiguous()

    def images_for(self, spec: ModelSpec) -> torch.Tensor:
        """All images, preprocessed the way ``spec`` recorded (kept for the next call with the same preprocessing):
        for the checks that read a few hundred images; the benchmark streams :meth:`batches`.

        Returns:
            ``[N, C, H, W]`` float32, normalised.

        Raises:
            DataError: the model's classes do not match the dataset's.
        """
        key = json.dumps(dataclasses.asdict(self._check(spec)), sort_keys=True)
        if key not in self._cache:
            self._cache[key] = torch.cat(list(self.batches(spec, _CHUNK)))
            logger.debug("prepared %d validation images %s", len(self), list(self._cache[key].shape[1:]))
        return self._cache[key]
