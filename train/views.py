"""What a model sees of one sample: the timm transform, the training augmentation and per-sample mixing.

A training sample's view is a pure function of ``(seed, epoch, sample index)``: :class:`ImageSamples` seeds every
random draw of the transform (Python's, NumPy's and torch's generators) with :func:`sample_seed` and restores the
generators afterwards, and Mixup/CutMix draw their partner, weight and box from the same seed. Resumed runs replay
the uninterrupted run, any rank or worker produces the same view, and a cached teacher holds its outputs for exactly
the views the student trains on.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from slimforge.train.data import DataConfig


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


def build_transform(cfg: DataConfig, is_training: bool):
    """timm's train/eval transform for ``cfg`` (PIL image → normalised ``[C, H, W]`` float tensor).

    Training with ``augment``: random-resized crop (``crop_scale``, ``crop_ratio``), flip, colour jitter or an
    auto-augment policy, random erasing (timm ``create_transform``), preceded by translation jitter when asked.
    Every random draw comes from Python's ``random``, NumPy's or torch's global generator, which
    :class:`ImageSamples` seeds per sample.
    """
    from timm.data import create_transform

    mean, std = cfg.normalization()
    kwargs: dict[str, Any] = dict(
        input_size=(cfg.in_chans, cfg.image_size, cfg.image_size),
        mean=mean,
        std=std,
        interpolation=cfg.interpolation,
    )
    if is_training and cfg.augment:
        kwargs.update(is_training=True, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip)
        kwargs.update(color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment)
        kwargs.update(re_prob=cfg.re_prob, re_mode=cfg.re_mode, re_count=1)
    else:
        kwargs.update(is_training=False, crop_pct=1.0)
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

    def __len__(self) -> int:
        return len(self.ds)

    def view(self, epoch: int, index: int) -> tuple[torch.Tensor, int]:
        """The sample's transformed image ``[C, H, W]`` at ``epoch`` and its label."""
        row = self.ds[int(index)]
        image = row["image"].convert(self.mode)
        # timm's transforms draw from `random`, NumPy's and torch's global RNGs (RandAugment picks its operations
        # with np.random): seed all three per sample, then restore them.
        s = sample_seed(self.seed, epoch, int(index))
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
            pixels = self.transform(image)
        random.setstate(py_state)
        np.random.set_state(np_state)
        return pixels, row["label"]

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
