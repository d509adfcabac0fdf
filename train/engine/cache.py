"""Writing the teacher cache under ``accelerate launch``: each rank runs the teacher on its contiguous share of the
samples, epoch by epoch, and appends its files; rank 0 writes ``cache.json`` last and moves the complete folder into
place. What the cache holds: :mod:`slimforge.train.teacher_cache`; its files: :mod:`slimforge.train.cache_files`."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Any

import torch

from slimforge.train.cache_files import (
    META,
    ShardWriter,
    cache_bytes,
    cache_layout,
    check_free_space,
    commit_cache,
    index_dtype,
)
from slimforge.train.errors import ConfigError, SlimforgeError
from slimforge.train.teacher_cache import cache_dir, cached_epochs, random_views, teacher_digest, view_fingerprint

logger = logging.getLogger(__name__)


class EpochMajorKeys:
    """The ``(epoch, sample index)`` keys of samples ``[start, stop)`` for each of ``epochs`` epochs, epoch by epoch
    (a sampler: generated as the loader asks, never held as a list of epochs × samples)."""

    def __init__(self, epochs: int, start: int, stop: int) -> None:
        self.epochs, self.start, self.stop = epochs, start, stop

    def __len__(self) -> int:
        return self.epochs * (self.stop - self.start)

    def __iter__(self):
        return ((e, i) for e in range(self.epochs) for i in range(self.start, self.stop))


def build_cache(cfg) -> dict[str, Any]:
    """Runs the teacher over ``cached_epochs(cfg)`` augmented epochs of the training split (under
    ``accelerate launch``: each rank its share) and writes the cache. Returns its ``cache.json`` content.

    Raises:
        SlimforgeError: no teacher checkpoint, a top-k above the class count, an unwritable or existing folder.
    """
    from slimforge.train.data import ImageSamples, build_loader, describe
    from slimforge.train.engine.dataload import load_splits_once
    from slimforge.train.engine.evaluate import data_for_model, evaluate
    from slimforge.train.engine.topology import build_accelerator
    from slimforge.train.models.load import load_or_build
    from slimforge.train.placement import place_teacher
    from slimforge.train.task import freeze_, teacher_view

    if cfg.teacher is None or not cfg.teacher.checkpoint:
        raise SlimforgeError("caching needs a teacher checkpoint", "set teacher.checkpoint=<teacher run>/checkpoint")
    accelerator = build_accelerator(cfg.train)
    # The student's batches, as fit() resolves them (the teacher checkpoint keeps its own input; its view converts).
    cfg = dataclasses.replace(cfg, data=data_for_model(cfg.data, cfg.model))
    splits = load_splits_once(cfg.data, accelerator)
    info = describe(cfg.data)
    k_all = splits.num_classes
    if cfg.cache.topk is not None and cfg.cache.topk > k_all:
        raise ConfigError(
            [f"cache.topk: {cfg.cache.topk} is more than the dataset's {k_all} classes"],
            fix=f"set cache.topk to at most {k_all}, or null to keep all of them",
        )
    k = cfg.cache.topk or k_all
    out = cache_dir(cfg)
    if (out / META).exists() and not cfg.train.overwrite:
        raise SlimforgeError(
            f"{out} already holds a teacher cache", "pass train.overwrite=true to replace it, or set cache.path"
        )
    # The size is known before any logit: refuse a cache that cannot fit, on every rank, before anything is written.
    epochs = cached_epochs(cfg)
    samples = ImageSamples(splits.train, cfg.data, is_training=True, seed=cfg.train.seed)
    layout = cache_layout(epochs, len(samples), k_all, k, cfg.cache.dtype, int(os.environ.get("WORLD_SIZE", "1")))
    needed = cache_bytes(layout)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"teacher cache {out}: {epochs} epoch(s) × {len(samples)} samples × top-{k} of {k_all} classes "
              f"({cfg.cache.dtype} values, {index_dtype(k_all).name} classes, float32 log-sum-exp): "
              f"{needed / 1e9:.3f} GB", flush=True)  # fmt: skip
    check_free_space(out, needed)
    teacher, spec = load_or_build(cfg.teacher, "teacher", k_all, info["input_size"], info, splits.class_names)
    teacher = teacher_view(freeze_(teacher), spec, info)
    run = cfg.train
    teacher = place_teacher(teacher, "replicated", accelerator.device, 1, run.teacher_dtype, run.channels_last)
    rank = accelerator.process_index
    layout = cache_layout(epochs, len(samples), k_all, k, cfg.cache.dtype, accelerator.num_processes)
    keys = EpochMajorKeys(epochs, *layout["shards"][rank])  # this rank's share, in the order its files hold it
    batch = cfg.cache.batch_size or cfg.data.eval_batch_size
    loader = torch.utils.data.DataLoader(samples, batch_size=batch, sampler=keys, num_workers=cfg.data.num_workers)
    tmp = out.with_name(out.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    writer = ShardWriter(tmp, layout, rank)
    t = cfg.loss.temperature
    with torch.no_grad():
        for b in loader:
            with accelerator.autocast():
                logits = teacher(b["pixel_values"].to(accelerator.device)).float()  # [B, N]
            values, indices = logits.topk(k, dim=1)  # [B, k], largest first
            lse = torch.logsumexp(logits / t, dim=1)  # [B]
            writer.append(b["epoch"], b["index"], values.cpu(), indices.cpu(), lse.cpu())  # a device sync
    writer.close()
    val_loader = accelerator.prepare(build_loader(splits.val, cfg.data, is_training=False))
    teacher_val_acc = evaluate(teacher, val_loader, accelerator)["acc"]
    meta = {
        **layout,
        "teacher": {"checkpoint": str(cfg.teacher.checkpoint), "sha256": teacher_digest(cfg.teacher.checkpoint)},
        "view": view_fingerprint(cfg),
        "random_views": random_views(cfg.data),
        "temperature": t,
        "teacher_val_acc": teacher_val_acc,
        "seconds": round(time.perf_counter() - start, 2),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = commit_cache(tmp, out, meta)
        logger.info("wrote %s: %d epochs × %d samples, top-%d of %d classes, %.1f MB", out, epochs, len(samples), k,
                    k_all, meta["bytes"] / 1e6)  # fmt: skip
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return meta
