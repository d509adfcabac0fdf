"""What a model sees of one sample: its own preprocessing, the timm transform, the training augmentation and
per-sample mixing.

A model's evaluation transform is its own: a config's preprocessing fields left ``None`` take what the model asks
for (a timm ``pretrained_cfg``, or what a checkpoint recorded), as timm's ``validate.py`` feeds it
(:func:`resolve_preprocessing`).

A training sample's view is a pure function of ``(seed, epoch, sample index)``: :class:`ImageSamples` seeds every
random draw of the transform (Python's, NumPy's and torch's generators) with :func:`sample_seed` and restores the
generators afterwards, and Mixup/CutMix draw their partner, weight and box from the same seed. Resumed runs replay
the uninterrupted run, any rank or worker produces the same view, and a cached teacher holds its outputs for exactly
the views the student trains on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from slimforge.train.errors import DataError, first_line

if TYPE_CHECKING:
    from slimforge.train.data import DataConfig
    from slimforge.train.models import ModelSpec

logger = logging.getLogger(__name__)
_MAX_SKIPPED_IN_A_ROW = 64
"""With ``data.skip_unreadable``: more unreadable images in a row than this are not bad files but a bad dataset."""


def policy_problems(policy: str) -> list[str]:
    """A timm auto-augment policy string that timm cannot parse, named with the forms it takes."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    hparams = {"translate_const": 10, "img_mean": (128, 128, 128)}
    try:
        if policy.startswith("rand"):
            rand_augment_transform(policy, hparams)
        elif policy.startswith("augmix"):
            augment_and_mix_transform(policy, hparams)
        else:
            auto_augment_transform(policy, hparams)
    except Exception as e:  # timm raises AssertionError/KeyError/ValueError on a bad policy
        return [
            f"auto_augment: {policy!r} is not a timm policy ({type(e).__name__}: {e}); use e.g. "
            "rand-m9-mstd0.5-inc1 (RandAugment), original or v0 (AutoAugment), augmix-m5-w4-d2"
        ]
    return []


DEFAULT_IMAGE_SIZE = 32
"""Input height = width when neither the config nor the model says (the embedded 28-px digits, padded)."""


def own_preprocessing(model: nn.Module) -> dict[str, Any] | None:
    """How a timm model asks to be fed: ``resolve_data_config({}, model=model)`` (``input_size``, ``interpolation``,
    ``mean``, ``std``, ``crop_pct``, ``crop_mode`` from its ``pretrained_cfg``), or ``None`` for a model without one
    (torchvision, a user factory)."""
    from timm.data import resolve_data_config

    if not getattr(model, "pretrained_cfg", None):
        return None
    return resolve_data_config({}, model=model)


def spec_preprocessing(spec: ModelSpec) -> dict[str, Any]:
    """The preprocessing a checkpoint or an artifact records for its model (:class:`ModelSpec`); a description
    written before crop_pct was recorded was evaluated with the full image (crop_pct 1.0, center)."""
    return {
        "input_size": list(spec.input_size),
        "interpolation": spec.interpolation,
        "mean": list(spec.mean) or None,
        "std": list(spec.std) or None,
        "crop_pct": spec.crop_pct,
        "crop_mode": spec.crop_mode,
    }


def resolve_preprocessing(cfg: DataConfig, own: dict[str, Any] | None = None) -> DataConfig:
    """``cfg`` with every preprocessing field decided: the config's value where it sets one, else the model's own
    (``own``: :func:`own_preprocessing` of a model with pretrained weights, :func:`spec_preprocessing` of a checkpoint),
    else the data's default (32 px, bilinear, the dataset's mean/std, the whole image: crop_pct 1.0, center).

    The model's mean/std count only when they have one value per ``cfg.in_chans`` channel (an ImageNet RGB
    normalisation says nothing about grayscale digits); its input channels never override ``in_chans``.

    Example:
        >>> from slimforge.train.data import DataConfig
        >>> own = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
        ...        "crop_pct": 0.9, "crop_mode": "center"}
        >>> c = resolve_preprocessing(DataConfig(in_chans=3, crop_pct=1.0), own)
        >>> c.image_size, c.interpolation, c.crop_pct, c.mean
        (224, 'bicubic', 1.0, [0.5, 0.5, 0.5])
    """
    own = own or {}
    size = own.get("input_size")
    taken = {
        "image_size": int(size[-1]) if size and size[-1] == size[-2] else None,
        "interpolation": own.get("interpolation"),
        "crop_pct": own.get("crop_pct"),
        "crop_mode": own.get("crop_mode"),
    }
    for key in ("mean", "std"):
        values = own.get(key)
        taken[key] = [float(v) for v in values] if values is not None and len(values) == cfg.in_chans else None
    if cfg.mean is not None or cfg.std is not None:  # a normalisation is a pair: a config's half is not mixed
        taken["mean"] = taken["std"] = None
    out = dataclasses.replace(cfg, **{k: v for k, v in taken.items() if getattr(cfg, k) is None})
    mean, std = out.normalization()  # the dataset's, where neither the config nor the model says
    return dataclasses.replace(
        out,
        image_size=out.image_size or DEFAULT_IMAGE_SIZE,
        interpolation=out.interpolation or "bilinear",
        mean=list(mean),
        std=list(std),
        crop_pct=1.0 if out.crop_pct is None else out.crop_pct,
        crop_mode=out.crop_mode or "center",
    )


def preprocessing(cfg: DataConfig) -> dict[str, Any]:
    """What a model is fed, as a checkpoint records it: ``input_size`` ``[C, H, W]``, ``interpolation``, ``mean``,
    ``std``, ``crop_pct``, ``crop_mode`` (of :func:`resolve_preprocessing`'s config, or the data's defaults)."""
    c = resolve_preprocessing(cfg)
    return {
        "input_size": [c.in_chans, c.image_size, c.image_size],
        "interpolation": c.interpolation,
        "mean": list(c.mean),
        "std": list(c.std),
        "crop_pct": c.crop_pct,
        "crop_mode": c.crop_mode,
    }


def build_transform(cfg: DataConfig, is_training: bool):
    """timm's train/eval transform for ``cfg`` (PIL image → normalised ``[C, H, W]`` float tensor).

    Evaluation: resize the shorter side to ``image_size / crop_pct`` and center-crop ``image_size`` (timm's
    ``transforms_imagenet_eval``, as timm's ``validate.py`` does), with the config's interpolation and normalisation;
    fields left ``None`` take the data's defaults (:func:`resolve_preprocessing` without a model).
    Training with ``augment``: random-resized crop (``crop_scale``, ``crop_ratio``), flip, colour jitter or an
    auto-augment policy, random erasing (timm ``create_transform``), preceded by translation jitter when asked.
    Every random draw comes from Python's ``random``, NumPy's or torch's global generator, which
    :class:`ImageSamples` seeds per sample.
    """
    from timm.data import create_transform

    cfg = resolve_preprocessing(cfg)
    kwargs: dict[str, Any] = dict(
        input_size=(cfg.in_chans, cfg.image_size, cfg.image_size),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        interpolation=cfg.interpolation,
    )
    if is_training and cfg.augment:
        kwargs.update(is_training=True, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip)
        kwargs.update(color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment)
        kwargs.update(re_prob=cfg.re_prob, re_mode=cfg.re_mode, re_count=1)
    else:
        kwargs.update(is_training=False, crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode)
    transform = create_transform(**kwargs)
    if is_training and cfg.augment and cfg.translate > 0:
        from torchvision import transforms as T

        shift = T.RandomAffine(degrees=0, translate=(cfg.translate, cfg.translate))
        transform = T.Compose([shift, *transform.transforms])
    return transform


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's random view: a pure function of its arguments (BLAKE2b of their decimal form), the
    same in every process, Python version and run, unlike ``hash()``."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


def _image_path(ds, index: int) -> str:
    """Where row ``index``'s image comes from: its file path, else (an image stored in the dataset) its row."""
    import datasets

    stored = ds.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))[index]["image"]
    return stored.get("path") or f"stored in row {index}"


def _seed_all(seed: int) -> None:
    """Seeds the three generators timm's transforms draw from (torch's CPU one only)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


class ImageSamples(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` split seen as ``{"pixel_values": [C, H, W], "label": int, "index": int, "epoch": int}``
    items, plus ``"target"`` ``[num_classes]`` (a soft label) when Mixup or CutMix is on.

    Keys are ``(epoch, index)`` pairs (from :class:`EpochShuffle`) or plain indices. The random view of a sample is
    seeded by ``(seed, epoch, index)`` alone (:func:`sample_seed`), so it is the same whichever rank or DataLoader
    worker draws it and whether or not the run was interrupted and resumed: that is what makes resumed runs replay
    the uninterrupted run exactly, and what lets a cached teacher hold its outputs for the views the student sees.
    Mixing is per sample for the same reason: the partner sample, the mixing weight and the CutMix box are drawn
    from the sample's own seed, and the partner comes in its own view of that epoch.
    """

    def __init__(self, ds, cfg: DataConfig, is_training: bool, seed: int = 0) -> None:
        self.ds = ds
        self.cfg = cfg
        self.transform = build_transform(cfg, is_training)
        self.mode = "L" if cfg.in_chans == 1 else "RGB"
        self.seed = seed
        self.mixing = is_training and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)
        self.num_classes = len(ds.features["label"].names) if self.mixing else 0
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.ds)

    def view(self, epoch: int, index: int) -> tuple[torch.Tensor, int]:
        """The sample's transformed image ``[C, H, W]`` at ``epoch`` and its label."""
        row = self._row(int(index))
        image = row["image"].convert(self.mode)
        # timm's transforms draw from `random`, NumPy's and torch's global RNGs (RandAugment picks its operations
        # with np.random): seed all three per sample. Only the CPU generator of torch: `torch.manual_seed` also
        # seeds every accelerator, ~90 us a call, a third of the gap to torchvision's loader (docs/data.md).
        s = sample_seed(self.seed, epoch, int(index))
        if torch.utils.data.get_worker_info() is not None:
            # A DataLoader worker's global generators serve this dataset alone: no state to keep (saving and
            # restoring them costs another ~0.2 ms a sample).
            _seed_all(s)
            return self.transform(image), row["label"]
        # In the training process itself the generators also drive dropout, drop-path and the model's init:
        # restore them, so loading data in-process changes nothing else.
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            _seed_all(s)
            pixels = self.transform(image)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)
        return pixels, row["label"]

    def _row(self, index: int) -> dict[str, Any]:
        """Row ``index`` with its image decoded. An image that cannot be read stops the run with its path named,
        or with ``data.skip_unreadable`` is replaced by the next readable one (a warning per file)."""
        for offset in range(_MAX_SKIPPED_IN_A_ROW):
            at = (index + offset) % len(self.ds)
            try:
                return self.ds[at]
            except Exception as e:  # PIL raises OSError (truncated), UnidentifiedImageError, SyntaxError ...
                where = _image_path(self.ds, at)
                if not self.cfg.skip_unreadable:
                    raise DataError(
                        f"image {where} (sample {at}) cannot be read: {first_line(e)}",
                        "replace or delete the file, or set data.skip_unreadable=true to train on without it",
                    ) from e
                if where not in self.skipped:
                    self.skipped.add(where)
                    logger.warning(
                        "skipped unreadable image %s (%s); %d skipped by this process so far",
                        where, first_line(e), len(self.skipped),
                    )  # fmt: skip
        raise DataError(
            f"{_MAX_SKIPPED_IN_A_ROW} images in a row from sample {index} on cannot be read (last: {where})",
            "check the dataset's files (a wrong path, a failed copy or an unmounted file system?)",
        )

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        pixels, label = self.view(epoch, int(index))
        item = {"pixel_values": pixels, "label": label, "index": int(index), "epoch": int(epoch)}
        if self.mixing:
            item["pixel_values"], item["target"] = self._mix(epoch, int(index), pixels, label)
        return item

    def _mix(self, epoch: int, index: int, pixels: torch.Tensor, label: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        rng = np.random.default_rng([sample_seed(self.seed, epoch, index), 1])  # independent of the view's draws
        target = torch.zeros(self.num_classes)
        target[label] = 1.0
        if rng.random() >= cfg.mix_prob:
            return pixels, target
        partner = int(rng.integers(len(self.ds)))
        other, other_label = self.view(epoch, partner)
        cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < cfg.mix_switch_prob)
        if cutmix:
            lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
            _, h, w = pixels.shape
            cut_h, cut_w = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            pixels = pixels.clone()
            pixels[:, y0:y1, x0:x1] = other[:, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually kept
        else:
            lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
            pixels = lam * pixels + (1.0 - lam) * other
        target = target * lam
        target[other_label] += 1.0 - lam
        return pixels, target
