"""``fit``: the one training loop of both entries, read top to bottom.

Everything that can be wrong with the input is checked before the process group or any output exists; then the
loop trains, evaluates once per epoch, checks that the replicas agree, saves resumable states when asked, and
writes the student checkpoint once, atomically, at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimforge.train.errors import SlimforgeError

if TYPE_CHECKING:
    from slimforge.train.schema import RunConfig, TrainConfig

logger = logging.getLogger(__name__)


def _dropout_probe() -> str:
    """A digest of the dropout mask this rank's RNG would draw next (drawn on a forked RNG: nothing consumed)."""
    import hashlib

    with torch.random.fork_rng(devices=[]):
        mask = torch.nn.functional.dropout(torch.ones(256), p=0.5)
    return hashlib.sha256(mask.numpy().tobytes()).hexdigest()[:16]


def _update_count(batches_per_epoch: int, train: TrainConfig) -> int:
    """Optimizer updates of the run: every epoch's batches in groups of ``grad_accum_steps`` (the last partial group
    steps too), at most ``max_steps``."""
    total = train.epochs * math.ceil(batches_per_epoch / train.grad_accum_steps)
    return total if train.max_steps is None else min(total, train.max_steps)


def fit(cfg: RunConfig, distill: bool) -> dict[str, Any]:
    """Trains ``cfg.model`` (with ``cfg.teacher`` when ``distill``) and writes the run folder.

    Returns:
        The run summary (also written to ``output_dir/summary.json``).

    Example:
        Launched on every rank by ``accelerate launch train/distill.py --config ...``::

            summary = fit(load_config(RunConfig, "configs/debug/tiny_distill.yaml"), distill=True)
            summary["val_acc"]
    """
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm

    from slimforge.train.config import dump_yaml, to_dict
    from slimforge.train.data import build_loader, describe, load_splits
    from slimforge.train.engine.compression import RecipeRun, calibration_batches
    from slimforge.train.engine.evaluate import evaluate
    from slimforge.train.engine.metrics import ComputeDtypeProbe, MetricsLog, ThroughputMeter
    from slimforge.train.engine.outputs import newest_state, prepare_run_folder
    from slimforge.train.engine.precision import (
        buffers_in_weight_precision,
        deepspeed_autocast,
        describe_numerics,
        fsdp_autocast,
        keep_configured_optimizer,
        match_input_dtype,
    )
    from slimforge.train.engine.replicas import check_replicas_in_sync
    from slimforge.train.engine.save import save_final
    from slimforge.train.engine.step import DivergenceGuard, train_step
    from slimforge.train.engine.topology import (
        build_accelerator,
        describe_topology,
        log_topology,
        set_gradient_clipping,
    )
    from slimforge.train.memory import param_bytes, state_memory
    from slimforge.train.models.load import described_teacher, load_or_build
    from slimforge.train.optim import build_optimizer, build_scheduler, scaled_lr
    from slimforge.train.placement import place_teacher
    from slimforge.train.state import clear_states, fingerprint, load_train_state, save_train_state
    from slimforge.train.task import CacheTeacher, LiveTeacher, StudentWithAdapters, build_task, freeze_, teacher_view
    from slimforge.train.teacher_cache import CachedTeacher, cache_dir

    out = Path(cfg.train.output_dir)
    if distill and cfg.teacher is None:
        raise SlimforgeError("distill.py needs a teacher", "set teacher.checkpoint=<teacher run>/checkpoint")
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    set_seed(cfg.train.seed)  # same seed on every rank: identical initial weights before DDP's broadcast

    # Build the models and data before the process group or any output exists: bad data, models, sizes or
    # checkpoints fail here, on every rank alike. (Hub datasets: `datasets` serialises concurrent downloads.)
    splits = load_splits(cfg.data)
    info = describe(cfg.data)
    shape = (splits.num_classes, info["input_size"], info, splits.class_names)
    student, spec = load_or_build(cfg.model, "model", *shape)
    teacher = teacher_spec = None
    cached = distill and cfg.train.teacher_placement == "cached"
    if distill and cached:
        teacher_spec = described_teacher(cfg.teacher, splits.class_names)  # no teacher runs: its record suffices
    elif distill:
        teacher, teacher_spec = load_or_build(cfg.teacher, "teacher", *shape)
        # Frozen before compression steps see it: a Taylor ranking or calibration pass must not update its
        # batch-norm statistics or compute with batch statistics. Then put behind the conversion to the input it
        # was trained on (size, channels, normalisation), when the student's data differ.
        teacher = teacher_view(freeze_(teacher), teacher_spec, info)
    recipe = RecipeRun(cfg.compress, loaded=spec.recipe)  # a loaded student's steps stay first
    recipe.check_model(student)

    on_gpu = torch.cuda.is_available() and not cfg.train.cpu
    pin = on_gpu and (cfg.data.pin_memory if cfg.data.pin_memory is not None else True)
    accelerator = build_accelerator(cfg.train, non_blocking=pin)
    set_gradient_clipping(accelerator, cfg.optim.grad_clip)
    keep_configured_optimizer(accelerator)
    recipe.check_topology(accelerator)
    if not distill:
        task = build_task(cfg.loss, supervised=True)
    elif cached:
        cache = CachedTeacher(cache_dir(cfg), cfg, splits.num_classes, len(splits.train), accelerator.device)
        task = build_task(cfg.loss, CacheTeacher(cache))
    else:
        task = build_task(cfg.loss, LiveTeacher(teacher))
    if distill and cfg.train.teacher_placement == "sharded" and accelerator.num_processes < 2:
        raise SlimforgeError(
            "train.teacher_placement=sharded splits the teacher across processes, and this run has one",
            "launch with 2 or more processes (configs/accelerate/ddp.yaml, zero*.yaml, fsdp.yaml) or set "
            "train.teacher_placement=replicated",
        )
    if len(splits.train) < cfg.data.batch_size * accelerator.num_processes:
        raise SlimforgeError(
            f"the training split has {len(splits.train)} images, fewer than one global batch of "
            f"{cfg.data.batch_size} × {accelerator.num_processes} processes",
            "lower data.batch_size or use more data",
        )
    prepare_run_folder(accelerator, out, cfg.train.overwrite)  # rank 0 decides, every rank follows
    train_loader = build_loader(splits.train, cfg.data, is_training=True, seed=cfg.train.seed, pin_memory=pin)
    # The update count for compression schedules that end with the run, before Accelerate shards the loader: each
    # rank will iterate len // processes batches of this drop_last loader (checked against the sharded one below).
    planned_steps = _update_count(len(train_loader) // accelerator.num_processes, cfg.train)
    if recipe:  # compression acts on the bare model, before any wrapper
        example = torch.zeros(1, *info["input_size"])
        batches = calibration_batches(splits.train, cfg.data)
        student = recipe.prepare(student, example, batches, accelerator.device, teacher, planned_steps)
    if cfg.train.channels_last:
        student = student.to(memory_format=torch.channels_last)
    wrapped = hasattr(task, "wrap_student")
    if wrapped:  # the task's trainable adapters join the student: trained, synced, saved in states, resumed with it
        student = task.wrap_student(student, torch.zeros(2, *info["input_size"]))
    topology = describe_topology(accelerator, cfg)
    lr = scaled_lr(cfg.optim, topology["global_batch"])
    configured = build_optimizer(student, cfg.optim, lr)
    val_loader = build_loader(splits.val, cfg.data, is_training=False, pin_memory=pin)
    deepspeed_autocast(accelerator)  # DeepSpeed bf16 trains as DDP's autocast does
    fsdp_autocast(accelerator)  # so does FSDP: FP32 parameters (batch norms too) under the autocast
    buffers_in_weight_precision(accelerator, student)  # DeepSpeed fp16: batch-norm statistics in fp16 too
    student, optimizer, train_loader, val_loader = accelerator.prepare(student, configured, train_loader, val_loader)
    topology.update(describe_numerics(accelerator, student, optimizer, configured, cfg.train.mixed_precision))

    def bare() -> nn.Module:
        """The student network itself (without the task's adapters or any wrapper)."""
        m = accelerator.unwrap_model(student)
        return m.student if isinstance(m, StudentWithAdapters) else m

    match_input_dtype(bare())  # DeepSpeed's fp16 student takes fp16 inputs
    updates_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum_steps)  # the last partial one steps too
    total_steps = _update_count(len(train_loader), cfg.train)
    if recipe and total_steps != planned_steps:
        raise SlimforgeError(
            f"the sharded training loader gives {total_steps} updates, the compression steps were planned for "
            f"{planned_steps}: this launch shards batches in a way the engine does not expect",
            "report this with the launch config; run without compress steps meanwhile",
        )
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.epochs * updates_per_epoch, lr)
    if teacher is not None:
        # Outside any wrapper Accelerate manages: no gradient sync, no optimizer state, not saved.
        teacher = place_teacher(
            teacher,
            cfg.train.teacher_placement,
            accelerator.device,
            accelerator.num_processes,
            dtype=cfg.train.teacher_dtype,
            channels_last=cfg.train.channels_last,
        )
        if cfg.train.compile_teacher:
            teacher = torch.compile(teacher)
        task.teacher.module = freeze_(teacher)

    position = {"step": 0, "epoch": 0, "batch": 0}
    run_print = fingerprint(cfg, accelerator)
    resumed = None
    if cfg.train.resume and not cfg.train.overwrite:
        newest = newest_state(accelerator, out / "state")  # rank 0's choice, seen by every rank
        resumed = load_train_state(accelerator, newest, run_print) if newest is not None else None
    else:
        clear_states(accelerator, out / "state")
    if resumed is None:
        # Dropout and drop-path masks differ per rank; data order and augmentation have their own seeds
        # (data.py), the same on every rank, and the weights were initialised above from the shared seed.
        torch.manual_seed(cfg.train.seed + accelerator.process_index)
    else:
        position = {k: resumed[k] for k in position}
        scheduler.last_epoch = position["step"]  # the LR is a pure function of the update count
        scheduler.step(position["step"])
        recipe.on_step(bare(), position["step"])  # switches follow the restored step
    if accelerator.is_main_process:  # prepare_run_folder created ``out``
        if resumed is None:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        dump_yaml(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    if cfg.train.tensorboard:
        accelerator.init_trackers("slimforge", config={"distill": distill, "epochs": cfg.train.epochs})
    metrics = MetricsLog(out / "metrics.jsonl", accelerator)
    log_topology(topology, cfg, lr, total_steps, distill)

    def save_state() -> None:
        save_train_state(accelerator, out / "state", dict(position), cfg.train.keep_states, run_print)

    dropout_probe = _dropout_probe() if cfg.train.record_samples else None
    seen: list[list[int]] = []
    history: list[float] = []
    digest = ""
    step = position["step"]
    meter = ThroughputMeter(sync=accelerator.device.type == "cuda")
    guard = DivergenceGuard(out / "state", check_gradients=cfg.train.mixed_precision != "fp16")
    compute_dtype = ComputeDtypeProbe(bare())  # what autocast really computed in
    for epoch in range(position["epoch"], cfg.train.epochs):
        if step >= total_steps:
            break
        student.train()
        train_loader.set_epoch(epoch)
        skip = position["batch"] if epoch == position["epoch"] else 0
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        seen.append([])
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            initial=skip,
            total=len(train_loader),
            disable=not accelerator.is_main_process,
        )
        for batch_idx, batch in enumerate(bar, start=skip):
            if step >= total_steps:  # max_steps reached mid-epoch
                break
            in_hand = time.perf_counter()
            if cfg.train.channels_last:
                batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
            losses = train_step(accelerator, student, task, optimizer, batch, cfg.optim.grad_clip, guard, step + 1)
            meter.step_done(in_hand)
            meter.count(batch["label"].shape[0] * accelerator.num_processes)
            if cfg.train.record_samples:
                seen[-1].extend(batch["index"].tolist())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            position.update(step=step, epoch=epoch, batch=batch_idx + 1)
            meter.update_done(step)
            recipe.on_step(bare(), step)
            if step % cfg.train.log_every == 0 or step == total_steps:
                # .item() is a sync point; only paid every log_every steps.
                record = {k: v.item() for k, v in losses.items() if k != "logits"}
                record.update(step=step, epoch=epoch + 1, split="train", lr=scheduler.get_last_lr()[0])
                metrics.log(record, step)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                save_state()
        bar.close()
        val = evaluate(student, val_loader, accelerator)
        history.append(val["acc"])
        metrics.log(
            {"step": step, "epoch": epoch + 1, "split": "val", "val_acc": val["acc"], "val_loss": val["loss"]}, step
        )
        logger.info("epoch %d: val acc %.4f, val loss %.4f (%d images)", epoch + 1, val["acc"], val["loss"], val["n"])
        digest = check_replicas_in_sync(student, accelerator)
        position.update(epoch=epoch + 1, batch=0)
        if cfg.train.checkpoint_every and step < total_steps and step % cfg.train.checkpoint_every:
            save_state()  # the epoch's end, unless its last update was just saved

    if not history:  # resumed from the state of the last update: nothing left to train, evaluate what it holds
        history.append(evaluate(student, val_loader, accelerator)["acc"])
        digest = check_replicas_in_sync(student, accelerator)

    summary: dict[str, Any] = {
        "mode": "distill" if distill else "train",
        "model": f"{spec.source}:{spec.name}",
        "val_acc": history[-1] if history else None,
        "val_acc_per_epoch": history,
        "epochs": cfg.train.epochs,
        "steps": step,
        "resumed_from_step": resumed["step"] if resumed else None,
        "processes": accelerator.num_processes,
        "process_index": accelerator.process_index,
        "distributed_type": topology["distributed_type"],
        "topology": topology,
        "global_batch": topology["global_batch"],
        "peak_lr": lr,
        "compress": [step["method"] for step in recipe.recipe()],
        "train_compute_dtype": compute_dtype.dtype,
        **meter.summary(),
        # Collectives: every rank reports what it holds.
        "state_memory_per_rank": gather_object([state_memory(accelerator.unwrap_model(student), optimizer)]),
        "teacher_param_bytes_per_rank": gather_object([param_bytes(teacher) if teacher is not None else 0])
        if distill
        else None,
    }
    if distill:
        summary["teacher"] = f"{teacher_spec.source}:{teacher_spec.name}"
        if cached:  # measured by the caching run, on the same validation images
            summary["teacher_val_acc"] = cache.meta["teacher_val_acc"]
        else:
            summary["teacher_val_acc"] = evaluate(teacher, val_loader, accelerator)["acc"]
    if cfg.train.record_samples:
        ranks = out / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": accelerator.process_index,
            "indices_per_epoch": seen,
            "state_sha256": digest,
            "dropout_mask_sha256": dropout_probe,
        }
        (ranks / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
    recipe.convert(bare())  # in place, on every rank, before the state is gathered
    spec.recipe = recipe.recipe()
    extra = {"data": dataclasses.asdict(cfg.data), "config": to_dict(cfg)}
    # The adapters of the task stay out of the checkpoint: it holds the student network only.
    save_final(accelerator, student, spec, out, summary, extra=extra, prefix="student." if wrapped else "")
    accelerator.end_training()
    return summary
