"""The cached teacher (``train.teacher_placement: cached``): the teacher runs once, distillation reads its outputs.

``accelerate launch train/cache_teacher.py --config RUN.yaml`` (:func:`slimforge.train.engine.cache.build_cache`)
runs the frozen teacher over every training sample
for ``cache.epochs`` epochs, on the exact augmented view the student will see at that epoch (augmentation is a
pure function of ``(train.seed, epoch, sample index)``, :mod:`slimforge.train.data`), each rank on its share of
the samples, and stores per (epoch, sample) the teacher's top-k logits (values and class indices, ``cache.dtype``)
and the log-sum-exp of all its logits at the loss temperature. ``train/distill.py`` with
``train.teacher_placement=cached`` then looks the outputs up by the batch's ``(epoch, index)`` instead of running
the teacher: a distillation step costs what a supervised step does.

With ``cache.topk`` null (all classes) the stored logits are the teacher's own, so every logit task (``kd``,
``dkd``, standardised logits) runs on them exactly as on the live teacher's. With k < classes the ``kd`` task uses
:func:`slimforge.train.losses.topk_kd_loss` on k + 1 buckets (the k stored classes and the rest, whose mass the
stored log-sum-exp gives).

The cache is refused, with the fields named, when it was made from another teacher (its weights' SHA-256), another
view of the data (dataset, split, image size, normalisation, augmentation settings, ``train.seed``) or another
temperature, or when the run trains more augmented epochs than it holds. Without random augmentation every epoch
sees the same view, so one cached epoch serves them all.

Layout of ``cache.path``: ``cache.json`` (what it holds, written last: a folder without it is incomplete) and one
``shard_RRRRR.safetensors`` per rank of the caching launch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from slimforge.train.config import at_least
from slimforge.train.errors import SlimforgeError

logger = logging.getLogger(__name__)

CACHE_FORMAT = "slimforge.teacher_cache"
CACHE_VERSION = 1
META = "cache.json"
# Data fields that change how a training sample is loaded, not what the teacher sees.
_LOADER_ONLY = {
    "batch_size",
    "eval_batch_size",
    "num_workers",
    "pin_memory",
    "persistent_workers",
    "prefetch_factor",
    "max_val_samples",
}


@dataclass
class CacheConfig:
    """The cached teacher's outputs: where, how many epochs, how many classes per sample, in which dtype."""

    path: str | None = None
    """Cache folder; null: ``<train.output_dir>/teacher_cache``. Written by train/cache_teacher.py, read by
    train/distill.py with ``train.teacher_placement=cached``."""
    epochs: int | None = None
    """Augmented epochs stored; null: ``train.epochs`` (1 without random augmentation: every epoch is the same)."""
    topk: int | None = None
    """Logits kept per sample (the largest); null: all classes (exact: any logit task runs on them)."""
    dtype: Literal["fp16", "fp32"] = "fp16"
    """Storage of the kept logits; fp32 for bit-exact agreement with the live teacher."""
    batch_size: int | None = None
    """Teacher batch of the caching pass; null: ``data.eval_batch_size``."""

    def validate(self) -> list[str]:
        return at_least(self, 1, "epochs", "topk", "batch_size")


def random_views(data) -> bool:
    """Whether a training sample's view changes with the epoch (random augmentation or mixing)."""
    mixing = getattr(data, "mixup_alpha", 0) > 0 or getattr(data, "cutmix_alpha", 0) > 0
    return bool(data.augment or mixing)


def view_fingerprint(cfg) -> dict[str, Any]:
    """What determines the teacher's outputs on the training samples: the data's view settings, the augmentation
    seed and the numerics the teacher runs in."""
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in _LOADER_ONLY}
    return {
        **{f"data.{k}": v for k, v in data.items()},
        "train.seed": cfg.train.seed,
        "train.mixed_precision": cfg.train.mixed_precision,
        "train.teacher_dtype": cfg.train.teacher_dtype,
        "train.channels_last": cfg.train.channels_last,
    }


def cache_dir(cfg) -> Path:
    return Path(cfg.cache.path) if cfg.cache.path else Path(cfg.train.output_dir) / "teacher_cache"


def cached_epochs(cfg) -> int:
    if cfg.cache.epochs is not None:
        return cfg.cache.epochs
    return cfg.train.epochs if random_views(cfg.data) else 1


def teacher_digest(checkpoint: str | os.PathLike) -> str:
    """The SHA-256 of the teacher checkpoint's weights file, as its ``slimforge.json`` records it."""
    from slimforge.train.checkpoint import read_meta

    return read_meta(checkpoint)["weights"]["sha256"]


def index_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds a class index."""
    return torch.int16 if num_classes <= 2**15 else torch.int32


class CachedTeacher:
    """The cached teacher's outputs, looked up by ``(epoch, sample index)``.

    Args:
        path: The cache folder.
        cfg: The distillation run's config (checked against what the cache was made from).
        num_classes: The dataset's class count.
        num_samples: The training split's size.
        device: Where lookups land.

    Raises:
        SlimforgeError: the folder holds no complete cache, or the cache was made from another teacher, another
            view of the data, another temperature, or holds fewer augmented epochs than the run trains.
    """

    def __init__(self, path: str | os.PathLike, cfg, num_classes: int, num_samples: int, device) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        build = f"build it: accelerate launch train/cache_teacher.py --config <this run config> cache.path={path}"
        if not (path / META).is_file():
            raise SlimforgeError(f"{path} holds no complete teacher cache (no {META})", build)
        meta = json.loads((path / META).read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
            raise SlimforgeError(f"{path}/{META} is not a slimforge teacher cache of version {CACHE_VERSION}", build)
        self.meta = meta
        self._check(meta, cfg, num_classes, num_samples, path, build)
        self.k, self.num_classes, self.epochs = meta["topk"], num_classes, meta["epochs"]
        self.random_views = meta["random_views"]
        self.temperature = meta["temperature"]
        e, n = meta["epochs"], num_samples
        self.values = torch.full((e, n, self.k), float("nan"), dtype=torch.float32)
        self.indices = torch.zeros((e, n, self.k), dtype=torch.int64)
        self.lse = torch.zeros((e, n), dtype=torch.float32)
        self.filled = torch.zeros((e, n), dtype=torch.bool)
        for shard in sorted(path.glob("shard_*.safetensors")):
            s = load_file(str(shard))
            if s["index"].numel() == 0:
                continue
            ep, ix = s["epoch"].long(), s["index"].long()
            self.values[ep, ix] = s["values"].float()
            self.indices[ep, ix] = s["indices"].long()
            self.lse[ep, ix] = s["lse"]
            self.filled[ep, ix] = True
        if not bool(self.filled.all()):
            missing = int((~self.filled).sum())
            raise SlimforgeError(f"the teacher cache {path} lacks {missing} (epoch, sample) entries", build)
        self.device = device
        logger.info(
            "cached teacher %s: %d epoch(s) × %d samples, top-%d of %d classes (%s), made from %s",
            path, e, n, self.k, num_classes, meta["dtype"], meta["teacher"]["checkpoint"],
        )  # fmt: skip

    @staticmethod
    def _check(meta: dict, cfg, num_classes: int, num_samples: int, path: Path, build: str) -> None:
        problems = []
        digest = teacher_digest(cfg.teacher.checkpoint)
        if meta["teacher"]["sha256"] != digest:
            problems.append(
                f"it was made from teacher {meta['teacher']['checkpoint']} (weights sha256 "
                f"{meta['teacher']['sha256'][:12]}...), this run's teacher {cfg.teacher.checkpoint} has "
                f"{digest[:12]}..."
            )
        now = view_fingerprint(cfg)
        changed = [
            f"{k}: {meta['view'].get(k)!r} -> {now.get(k)!r}"
            for k in sorted(set(now) | set(meta["view"]))
            if meta["view"].get(k) != now.get(k)
        ]
        if changed:
            problems.append("it was made from another view of the data: " + "; ".join(changed))
        if meta["num_classes"] != num_classes or meta["num_samples"] != num_samples:
            problems.append(
                f"it holds {meta['num_samples']} samples of {meta['num_classes']} classes, the training split has "
                f"{num_samples} of {num_classes}"
            )
        if meta["topk"] < meta["num_classes"] and abs(meta["temperature"] - cfg.loss.temperature) > 1e-12:
            problems.append(
                f"its top-{meta['topk']} log-sum-exp was taken at temperature {meta['temperature']}, the loss uses "
                f"{cfg.loss.temperature}"
            )
        if meta["random_views"] and cfg.train.epochs > meta["epochs"]:
            problems.append(
                f"it holds {meta['epochs']} augmented epoch(s) and this run trains {cfg.train.epochs} (each epoch "
                "sees other random views)"
            )
        if problems:
            raise SlimforgeError(
                f"the teacher cache {path} does not fit this run: " + " | ".join(problems),
                f"rebuild it for this run ({build}), or point cache.path at the matching cache",
            )

    def lookup(self, epoch: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values [B, k], indices [B, k], lse [B])`` of the samples ``index`` ``[B]`` at ``epoch`` ``[B]``."""
        e = epoch.long().cpu()
        if not self.random_views:
            e = torch.zeros_like(e)  # every epoch sees the same view
        i = index.long().cpu()
        d = self.device
        return self.values[e, i].to(d), self.indices[e, i].to(d), self.lse[e, i].to(d)

    def logits(self, epoch: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The teacher's full logits ``[B, N]`` (only when every class is stored)."""
        values, indices, _ = self.lookup(epoch, index)
        return torch.empty(values.shape[0], self.num_classes, device=values.device).scatter_(1, indices, values)
