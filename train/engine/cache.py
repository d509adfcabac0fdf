"""Writing the teacher cache under ``accelerate launch``: each rank runs the teacher on its share of the (epoch,
sample) views and writes its shard; rank 0 writes ``cache.json`` last and moves the complete folder into place.
What the cache holds and how it is read: :mod:`slimforge.train.teacher_cache`."""

from __future__ import annotations

import json
import logging
import shutil
import time
from typing import Any

import torch

from slimforge.train.errors import ConfigError, SlimforgeError
from slimforge.train.teacher_cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    META,
    cache_dir,
    cached_epochs,
    index_dtype,
    random_views,
    teacher_digest,
    view_fingerprint,
)

logger = logging.getLogger(__name__)


def build_cache(cfg) -> dict[str, Any]:
    """Runs the teacher over ``cached_epochs(cfg)`` augmented epochs of the training split (under
    ``accelerate launch``: each rank its share) and writes the cache. Returns its ``cache.json`` content.

    Raises:
        SlimforgeError: no teacher checkpoint, a top-k above the class count, an unwritable or existing folder.
    """
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    from slimforge.train.data import ImageSamples, build_loader, describe, load_splits
    from slimforge.train.engine.evaluate import evaluate
    from slimforge.train.engine.topology import build_accelerator
    from slimforge.train.models.load import load_or_build
    from slimforge.train.placement import place_teacher
    from slimforge.train.task import freeze_, teacher_view

    if cfg.teacher is None or not cfg.teacher.checkpoint:
        raise SlimforgeError("caching needs a teacher checkpoint", "set teacher.checkpoint=<teacher run>/checkpoint")
    splits = load_splits(cfg.data)
    info = describe(cfg.data)
    k_all = splits.num_classes
    if cfg.cache.topk is not None and cfg.cache.topk > k_all:
        raise ConfigError(
            [f"cache.topk: {cfg.cache.topk} is more than the dataset's {k_all} classes"],
            fix=f"set cache.topk to at most {k_all}, or null to keep all of them",
        )
    k = cfg.cache.topk or k_all
    teacher, spec = load_or_build(cfg.teacher, "teacher", k_all, info["input_size"], info, splits.class_names)
    teacher = teacher_view(freeze_(teacher), spec, info)
    out = cache_dir(cfg)
    if (out / META).exists() and not cfg.train.overwrite:
        raise SlimforgeError(
            f"{out} already holds a teacher cache", "pass train.overwrite=true to replace it, or set cache.path"
        )
    accelerator = build_accelerator(cfg.train)
    run = cfg.train
    teacher = place_teacher(teacher, "replicated", accelerator.device, 1, run.teacher_dtype, run.channels_last)
    epochs = cached_epochs(cfg)
    samples = ImageSamples(splits.train, cfg.data, is_training=True, seed=cfg.train.seed)
    keys = [(e, i) for e in range(epochs) for i in range(len(samples))]
    batch = cfg.cache.batch_size or cfg.data.eval_batch_size
    loader = torch.utils.data.DataLoader(samples, batch_size=batch, sampler=keys, num_workers=cfg.data.num_workers)
    loader = accelerator.prepare(loader)  # each rank its share (the last batch evened out with repeats)
    tmp = out.with_name(out.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    parts: dict[str, list[torch.Tensor]] = {"epoch": [], "index": [], "values": [], "indices": [], "lse": []}
    store = torch.float16 if cfg.cache.dtype == "fp16" else torch.float32
    t = cfg.loss.temperature
    with torch.no_grad():
        for b in loader:
            with accelerator.autocast():
                logits = teacher(b["pixel_values"]).float()  # [B, N]
            values, indices = logits.topk(k, dim=1)  # [B, k], largest first
            parts["epoch"].append(b["epoch"].cpu().to(torch.int32))
            parts["index"].append(b["index"].cpu().to(torch.int64))
            parts["values"].append(values.cpu().to(store))
            parts["indices"].append(indices.cpu().to(index_dtype(k_all)))
            parts["lse"].append(torch.logsumexp(logits / t, dim=1).cpu())
    shard = {name: torch.cat(v) if v else torch.zeros(0) for name, v in parts.items()}
    save_file(shard, str(tmp / f"shard_{accelerator.process_index:05d}.safetensors"))
    val_loader = accelerator.prepare(build_loader(splits.val, cfg.data, is_training=False))
    teacher_val_acc = evaluate(teacher, val_loader, accelerator)["acc"]
    counts = gather_object([int(shard["index"].numel())])
    meta = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "teacher": {"checkpoint": str(cfg.teacher.checkpoint), "sha256": teacher_digest(cfg.teacher.checkpoint)},
        "view": view_fingerprint(cfg),
        "random_views": random_views(cfg.data),
        "epochs": epochs,
        "num_samples": len(samples),
        "num_classes": k_all,
        "topk": k,
        "dtype": cfg.cache.dtype,
        "temperature": t,
        "teacher_val_acc": teacher_val_acc,
        "ranks": accelerator.num_processes,
        "entries_per_rank": counts,
        "seconds": round(time.perf_counter() - start, 2),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta["bytes"] = sum(p.stat().st_size for p in tmp.glob("shard_*.safetensors"))
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # the complete cache appears at once
        logger.info("wrote %s: %d epochs × %d samples, top-%d of %d classes, %.1f MB", out, epochs, len(samples), k,
                    k_all, meta["bytes"] / 1e6)  # fmt: skip
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return meta
