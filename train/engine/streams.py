"""The engine's side of a streamed training split (:mod:`slimforge.train.streaming`): its batches are already this
rank's, so Accelerate moves them to the device and tracks the epoch's end, and shards nothing."""

from __future__ import annotations

from slimforge.train.engine.topology import deepspeed_plugin


def is_stream(loader) -> bool:
    """Whether ``loader`` reads a stream that is already this rank's share (a ``webdataset`` training split)."""
    return hasattr(loader.dataset, "resume_at")


def stream_on_rank(loader, accelerator, batch_size: int):
    """``loader``'s stream as Accelerate's own per-rank loader: batches sent to ``accelerator.device`` (non-blocking
    when pinned) and the last batch of an epoch marked, so a partial gradient-accumulation group still steps, as
    with a prepared loader. DeepSpeed's ``auto`` micro-batch is set to ``batch_size`` (``prepare`` would otherwise
    read it from the validation loader, the only loader it is given)."""
    from accelerate.data_loader import DataLoaderShard

    plugin = deepspeed_plugin(accelerator)
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    return DataLoaderShard(
        loader.dataset,
        device=accelerator.device,
        _non_blocking=accelerator.dataloader_config.non_blocking,
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.persistent_workers,
        prefetch_factor=loader.prefetch_factor,
    )


def resume_loader(accelerator, loader, skip: int):
    """``loader`` from its batch ``skip`` on: a stream passes over the trained batches' samples without decoding
    them; an indexed loader skips them in its sampler (Accelerate)."""
    if not skip:
        return loader
    if is_stream(loader):
        loader.dataset.resume_at(skip)
        return loader
    return accelerator.skip_first_batches(loader, skip)
