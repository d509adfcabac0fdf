"""The training engine: the one library module that talks to Accelerate.

``fit`` runs the same linear loop for supervised training and distillation, under whatever topology
``accelerate launch`` set up (single process, DDP on GPUs, or several CPU processes over gloo). Everything
that can be wrong with the input is checked before the first step; the student checkpoint is written once,
atomically, at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from train.errors import ModelError, SlimforgeError
from train.placement import Placement

if TYPE_CHECKING:
    from train.schema import RunConfig

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """The loop, its outputs and its numerics."""

    output_dir: str = "runs/run"
    """Run folder: resolved config, metrics.jsonl, TensorBoard logs and the final ``checkpoint/``."""
    epochs: int = 10
    seed: int = 42
    """Seeds model init, shuffling and augmentation (the same on every rank; Accelerate shards the batches)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision: bf16 on CPU or GPU, fp16 on GPU only; weights and optimizer stay fp32."""
    log_every: int = 20
    """Log train loss/LR every N optimizer steps."""
    overwrite: bool = False
    """Allow replacing a finished run in ``output_dir``; otherwise an existing checkpoint there is an error."""
    tensorboard: bool = True
    """Also log metrics to TensorBoard (``output_dir/tensorboard``)."""
    record_samples: bool = False
    """Write the dataset indices each rank trained on to ``output_dir/ranks/`` (checks data sharding)."""
    cpu: bool = False
    """Train on CPU even when a GPU is present."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer update; global batch = batch_size × processes × this.
    Under DeepSpeed it must equal the launch config's ``gradient_accumulation_steps``."""
    max_steps: int | None = None
    """Stop after this many optimizer updates (the LR schedule still spans ``epochs``); null runs all epochs."""
    checkpoint_every: int | None = None
    """Save the full resumable training state every N optimizer updates (and at every epoch end) under
    ``output_dir/state/``; null saves none. A relaunch of the same command resumes from the newest one."""
    keep_states: int = 2
    """How many resumable states to keep."""
    resume: bool = True
    """Resume from the newest complete state in ``output_dir/state/`` if there is one."""
    teacher_placement: Placement = "replicated"
    """replicated: a full frozen copy of the teacher on every rank, outside any DDP/DeepSpeed/FSDP wrapper
    (memory per rank = teacher weights + activations of one micro-batch; no communication). sharded: the
    teacher's weights split across the ranks with FSDP2 for inference (1/world of them per rank, plus the
    layers being gathered; an all-gather of the teacher per micro-batch); needs >= 2 processes. See
    train/placement.py."""

    def validate(self) -> list[str]:
        p = []
        if self.grad_accum_steps < 1:
            p.append(f"grad_accum_steps: {self.grad_accum_steps} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"max_steps: {self.max_steps} must be >= 1 or null")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            p.append(f"checkpoint_every: {self.checkpoint_every} must be >= 1 or null")
        if self.keep_states < 1:
            p.append(f"keep_states: {self.keep_states} must be >= 1")
        if self.epochs < 1:
            p.append(f"epochs: {self.epochs} must be >= 1")
        if self.log_every < 1:
            p.append(f"log_every: {self.log_every} must be >= 1")
        if not self.output_dir:
            p.append("output_dir: must be a folder path")
        return p


def build_accelerator(cfg: TrainConfig):
    """An ``Accelerator`` for the launched topology, on CPU (gloo) when no GPU is present."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    on_cpu = cfg.cpu or not torch.cuda.is_available()
    if on_cpu and cfg.mixed_precision == "fp16":
        raise SlimforgeError(
            "train.mixed_precision=fp16 needs a GPU, and this run is on CPU",
            "use train.mixed_precision=bf16 (CPU autocast) or no",
        )
    # Without an explicit gloo backend on CPU, DeepSpeed launches see num_processes=1 while the world is 2
    # (FACTS.md); DDP on CPU picks gloo either way.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and multi_process else []
    # cpu=True would turn a DeepSpeed launch into plain MULTI_CPU; DeepSpeed picks its CPU accelerator itself.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(
        cpu=on_cpu and not deepspeed,
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard" if cfg.tensorboard else None,
        project_dir=str(Path(cfg.output_dir) / "tensorboard"),
        kwargs_handlers=handlers,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum_steps),
    )
    check_topology(accelerator, cfg)
    return accelerator


def check_topology(accelerator, cfg: TrainConfig) -> None:
    """Stops a run whose topology is not what the launcher asked for (FACTS.md lists the silent cases).

    Checked: the launcher's world size against Accelerate's; an FSDP or DeepSpeed launch that Accelerate
    dropped (FSDP on a CPU-only machine silently becomes ``DistributedType.NO``: every process would train
    alone, unsynchronised); DeepSpeed's gradient accumulation against ``train.grad_accum_steps``.
    """
    from accelerate.utils import DistributedType

    world = int(os.environ.get("WORLD_SIZE", "1"))
    fix = "launch with a config from configs/accelerate/ that this machine supports (ddp.yaml works everywhere)"
    if world != accelerator.num_processes:
        raise SlimforgeError(
            f"the launcher started {world} processes but Accelerate runs {accelerator.num_processes} "
            f"({accelerator.distributed_type}); they would train without syncing gradients",
            fix,
        )
    asked = {
        "FSDP": (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true", DistributedType.FSDP),
        "DeepSpeed": (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true", DistributedType.DEEPSPEED),
    }
    for name, (requested, dtype) in asked.items():
        if requested and accelerator.distributed_type != dtype:
            device = "a machine without a GPU" if not torch.cuda.is_available() else str(accelerator.device)
            raise SlimforgeError(
                f"the launch config asks for {name}, but Accelerate set up {accelerator.distributed_type} on "
                f"{device}: the {world} processes would each train alone, without syncing gradients",
                f"{fix}; on CPU use ddp.yaml or a DeepSpeed config (zero*.yaml)",
            )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        ds_accum = plugin.deepspeed_config.get("gradient_accumulation_steps")
        if ds_accum not in (None, "auto", cfg.grad_accum_steps):
            raise SlimforgeError(
                f"train.grad_accum_steps is {cfg.grad_accum_steps} but the DeepSpeed launch config says "
                f"gradient_accumulation_steps: {ds_accum}",
                f"set train.grad_accum_steps={ds_accum} or change the launch config",
            )


def describe_topology(accelerator, cfg: RunConfig) -> dict[str, Any]:
    """What took effect, gathered from every rank (a collective), for the log and summary.json."""
    import socket

    from accelerate.utils import gather_object

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    fsdp = getattr(accelerator.state, "fsdp_plugin", None)
    sharding = "none (replicated)"
    if plugin is not None:
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        offload = [k for k in ("offload_optimizer", "offload_param") if zero.get(k, {}).get("device", "none") != "none"]
        sharding = f"DeepSpeed ZeRO-{plugin.zero_stage}" + (f" (offload: {', '.join(offload)})" if offload else "")
    elif fsdp is not None:
        sharding = f"FSDP {fsdp.sharding_strategy}"
    rank = {
        "rank": accelerator.process_index,
        "local_rank": accelerator.local_process_index,
        "host": socket.gethostname(),
        "device": str(accelerator.device),
        "threads": torch.get_num_threads(),
    }
    accum = cfg.train.grad_accum_steps
    return {
        "distributed_type": str(accelerator.distributed_type),
        "world_size": accelerator.num_processes,
        "micro_batch_per_rank": cfg.data.batch_size,
        "grad_accum_steps": accum,
        "global_batch": cfg.data.batch_size * accelerator.num_processes * accum,
        "sharding": sharding,
        "mixed_precision": str(accelerator.mixed_precision),
        "teacher_placement": cfg.train.teacher_placement,
        "ranks": gather_object([rank]),
    }


def state_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter (names and bytes): equal digests mean identical trained weights.

    Buffers are left out on purpose: BatchNorm running statistics are per-rank under DeepSpeed (DDP broadcasts
    rank 0's before each forward), and they are not what gradient synchronisation keeps equal.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas_in_sync(model: nn.Module, accelerator) -> str:
    """Gathers every rank's state digest; raises if any rank's weights differ. Returns this rank's digest.

    This is a collective (all ranks must call it) and a CPU sync point; it runs once per epoch.
    """
    from accelerate.utils import DistributedType, gather_object

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    replicated = accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU) or (
        plugin is not None and plugin.zero_stage < 3  # ZeRO-1/2 shard optimizer state, not parameters
    )
    digest = state_digest(accelerator.unwrap_model(model)) if replicated or accelerator.num_processes == 1 else ""
    if replicated and accelerator.num_processes > 1:
        digests = gather_object([digest])
        if len(set(digests)) != 1:
            raise SlimforgeError(
                f"student replicas diverged across ranks (digests {[d[:8] for d in digests]}): gradients are "
                "not being synchronised",
                "report this with the launch config; do not use these weights",
            )
    return digest


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator) -> dict[str, float]:
    """Top-1 accuracy and cross-entropy over the whole (sharded) validation loader, identical on all ranks."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = 0
    for batch in loader:
        with accelerator.autocast():
            logits = model(batch["pixel_values"])
        # gather_for_metrics drops the samples Accelerate duplicated to even out the last batch.
        logits, labels = accelerator.gather_for_metrics((logits.float(), batch["label"]))
        correct += (logits.argmax(-1) == labels).sum()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        count += labels.numel()
    model.train(was_training)
    return {"acc": (correct / max(count, 1)).item(), "loss": (loss_sum / max(count, 1)).item(), "n": count}


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process) and mirrors scalars to trackers."""

    def __init__(self, path: Path, accelerator) -> None:
        self.path = path
        self.accelerator = accelerator

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        self.accelerator.log(scalars, step=step)


def _load_or_build(cfg, role: str, num_classes: int, input_size: list[int], data_info: dict, class_names):
    """A bare model from a checkpoint (architecture + weights) or from a model name."""
    from train.checkpoint import load_checkpoint
    from train.models import build_model, check_input, resolve_num_classes

    resolve_num_classes(cfg, num_classes, role)
    if cfg.checkpoint is None:
        return build_model(cfg, num_classes, input_size, data_info, class_names)
    model, spec, _ = load_checkpoint(cfg.checkpoint)
    if cfg.name is not None and (cfg.name != spec.name or cfg.source != spec.source):
        raise ModelError(
            f"{role}.name is {cfg.source} {cfg.name!r} but {cfg.checkpoint} holds {spec.source} {spec.name!r}",
            f"remove {role}.name (the checkpoint says what it holds) or point {role}.checkpoint elsewhere",
        )
    if spec.num_classes != num_classes:
        raise ModelError(
            f"{role} checkpoint {cfg.checkpoint} has {spec.num_classes} classes but the dataset has {num_classes}",
            "distil on the dataset the teacher was trained on, or train a teacher for this dataset first",
        )
    if spec.in_chans != input_size[0]:
        raise ModelError(
            f"{role} checkpoint {cfg.checkpoint} takes {spec.in_chans}-channel images, data.in_chans is "
            f"{input_size[0]}",
            f"set data.in_chans={spec.in_chans}",
        )
    if spec.mean and (list(spec.mean) != list(data_info["mean"]) or list(spec.std) != list(data_info["std"])):
        logger.warning(
            "%s was trained with mean/std %s/%s, the data uses %s/%s",
            role,
            spec.mean,
            spec.std,
            data_info["mean"],
            data_info["std"],
        )
    spec.input_size = list(input_size)
    check_input(model, spec)
    return model.train(), spec


def fit(cfg: RunConfig, distill: bool) -> dict[str, Any]:
    """Trains ``cfg.model`` (with ``cfg.teacher`` when ``distill``) and writes the run folder.

    Returns:
        The run summary (also written to ``output_dir/summary.json``).
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from compress.api import apply_recipe_
    from train.checkpoint import save_checkpoint
    from train.config import dump_yaml, to_dict
    from train.data import build_loader, describe, load_splits
    from train.optim import build_optimizer, build_scheduler, scaled_lr
    from train.placement import place_teacher
    from train.state import load_train_state, save_train_state
    from train.task import DistillationTask, SupervisedTask, freeze_

    out = Path(cfg.train.output_dir)
    final_ckpt = out / "checkpoint"
    if final_ckpt.exists() and not cfg.train.overwrite:
        raise SlimforgeError(
            f"{final_ckpt} already holds a finished run", "choose another train.output_dir or set train.overwrite=true"
        )
    if distill and cfg.teacher is None:
        raise SlimforgeError("distill.py needs a teacher", "set teacher.checkpoint=<teacher run>/checkpoint")

    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    set_seed(cfg.train.seed)  # same seed on every rank: identical initial weights before DDP's broadcast

    # Build every component before the process group or any output exists: bad data, models, sizes or
    # checkpoints fail here, on every rank alike. (Hub datasets: `datasets` serialises concurrent
    # downloads with file locks.)
    splits = load_splits(cfg.data)
    info = describe(cfg.data)
    input_size = info["input_size"]
    student, spec = _load_or_build(cfg.model, "model", splits.num_classes, input_size, info, splits.class_names)
    teacher = None
    if distill:
        teacher, teacher_spec = _load_or_build(
            cfg.teacher, "teacher", splits.num_classes, input_size, info, splits.class_names
        )
    apply_recipe_(student, cfg.compress)  # compression acts on the bare model, before any wrapper
    spec.recipe = list(cfg.compress)

    accelerator = build_accelerator(cfg.train)
    if distill and cfg.train.teacher_placement == "sharded" and accelerator.num_processes < 2:
        raise SlimforgeError(
            "train.teacher_placement=sharded splits the teacher across processes, and this run has one",
            "launch with 2 or more processes (configs/accelerate/ddp.yaml, zero*.yaml, fsdp.yaml) or set "
            "train.teacher_placement=replicated",
        )
    topology = describe_topology(accelerator, cfg)
    lr = scaled_lr(cfg.optim, topology["global_batch"])
    optimizer = build_optimizer(student, cfg.optim, lr)
    train_loader = build_loader(splits.train, cfg.data, is_training=True, seed=cfg.train.seed)
    val_loader = build_loader(splits.val, cfg.data, is_training=False)
    if len(splits.train) < cfg.data.batch_size * accelerator.num_processes:
        raise SlimforgeError(
            f"the training split has {len(splits.train)} images, fewer than one global batch of "
            f"{cfg.data.batch_size} × {accelerator.num_processes} processes",
            "lower data.batch_size or use more data",
        )
    student, optimizer, train_loader, val_loader = accelerator.prepare(student, optimizer, train_loader, val_loader)
    accum = cfg.train.grad_accum_steps
    updates_per_epoch = math.ceil(len(train_loader) / accum)  # Accelerate also steps on an epoch's last batch
    total_steps = cfg.train.epochs * updates_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.epochs * updates_per_epoch, lr)
    if teacher is not None:
        # Outside any wrapper Accelerate manages: no gradient sync, no optimizer state, not saved.
        teacher = place_teacher(
            freeze_(teacher), cfg.train.teacher_placement, accelerator.device, accelerator.num_processes
        )
        task = DistillationTask(teacher, cfg.loss)
    else:
        task = SupervisedTask(cfg.loss)

    position = {"step": 0, "epoch": 0, "batch": 0}
    resumed = load_train_state(accelerator, out / "state") if cfg.train.resume else None
    if resumed is not None:
        position = {k: resumed[k] for k in position}
        scheduler.last_epoch = position["step"]  # the LR is a pure function of the update count
        scheduler.step(position["step"])
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if resumed is None:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        dump_yaml(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    if cfg.train.tensorboard:
        accelerator.init_trackers("slimforge", config={"distill": distill, "epochs": cfg.train.epochs})
    metrics = MetricsLog(out / "metrics.jsonl", accelerator)
    logger.info(
        "%s: %s, world size %d, micro-batch %d/rank × %d accumulation = global batch %d, sharding %s, "
        "mixed precision %s, teacher %s, peak LR %.3g (%s scaling from %g at batch %d), %d updates",
        "distillation" if distill else "training",
        topology["distributed_type"],
        topology["world_size"],
        topology["micro_batch_per_rank"],
        accum,
        topology["global_batch"],
        topology["sharding"],
        topology["mixed_precision"],
        topology["teacher_placement"] if distill else "none",
        lr,
        cfg.optim.lr_scaling,
        cfg.optim.lr,
        cfg.optim.reference_batch,
        total_steps,
    )
    for r in topology["ranks"]:
        logger.info(
            "rank %d (local %d) on %s: device %s, %d threads",
            r["rank"],
            r["local_rank"],
            r["host"],
            r["device"],
            r["threads"],
        )

    def save_state() -> None:
        save_train_state(accelerator, out / "state", dict(position), keep=cfg.train.keep_states)

    seen: list[list[int]] = []
    history = []
    digest = ""
    step = position["step"]
    t_start, images, t_steady, images_steady = time.perf_counter(), 0, None, 0
    t_last, images_last = t_start, 0
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
            x, y = batch["pixel_values"], batch["label"]
            with accelerator.accumulate(student):
                with accelerator.autocast():
                    losses = task(student, x, y)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and cfg.optim.grad_clip is not None:
                    accelerator.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
                optimizer.step()  # Accelerate's wrapper skips it on accumulation micro-steps
                optimizer.zero_grad(set_to_none=True)
            images += x.shape[0] * accelerator.num_processes
            if cfg.train.record_samples:
                seen[-1].extend(batch["index"].tolist())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            position.update(step=step, epoch=epoch, batch=batch_idx + 1)
            t_last, images_last = time.perf_counter(), images
            if step == 3:  # steady-state throughput excludes the first updates (allocator, thread pools)
                t_steady, images_steady = t_last, images
            if step % cfg.train.log_every == 0 or step == total_steps:
                # .item() is a sync point; only paid every log_every steps.
                record = {k: v.item() for k, v in losses.items() if k != "logits"}
                record.update(step=step, epoch=epoch + 1, split="train", lr=scheduler.get_last_lr()[0])
                metrics.log(record, step)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < total_steps:
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
        if cfg.train.checkpoint_every and step < total_steps:
            save_state()
    elapsed = time.perf_counter() - t_start
    from accelerate.utils import gather_object

    from train.memory import param_bytes, state_memory

    memory = gather_object([state_memory(accelerator.unwrap_model(student), optimizer)])
    teacher_memory = gather_object([param_bytes(teacher)]) if teacher is not None else None
    steady = t_last - t_steady if t_steady is not None and t_last > t_steady else None

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
        "train_seconds": round(elapsed, 2),
        "train_images_per_second": round(images / elapsed, 1),
        # Training steps only (no evaluation, no checkpointing), from the 3rd update to the last.
        "steady_images_per_second": round((images_last - images_steady) / steady, 1) if steady else None,
        "state_memory_per_rank": memory,
        "teacher_param_bytes_per_rank": teacher_memory,
    }
    if teacher is not None:
        summary["teacher"] = f"{teacher_spec.source}:{teacher_spec.name}"
        summary["teacher_val_acc"] = evaluate(teacher, val_loader, accelerator)["acc"]
    if cfg.train.record_samples:
        ranks = out / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        record = {"rank": accelerator.process_index, "indices_per_epoch": seen, "state_sha256": digest}
        (ranks / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))

    # Collective under DeepSpeed/FSDP (gathers shards): every rank calls it, the main process writes.
    state = accelerator.get_state_dict(student)
    if accelerator.is_main_process:
        extra = {"data": dataclasses.asdict(cfg.data), "summary": summary, "config": to_dict(cfg)}
        save_checkpoint(state, spec, final_ckpt, extra=extra)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.info("wrote %s", final_ckpt)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
