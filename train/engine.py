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
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from train.errors import ModelError, SlimforgeError

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

    def validate(self) -> list[str]:
        p = []
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
    from accelerate.utils import InitProcessGroupKwargs

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
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard" if cfg.tensorboard else None,
        project_dir=str(Path(cfg.output_dir) / "tensorboard"),
        kwargs_handlers=handlers,
    )
    check_topology(accelerator)
    return accelerator


def check_topology(accelerator) -> None:
    """Stops a run whose processes would not synchronise (e.g. a launcher world Accelerate did not join)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != accelerator.num_processes:
        raise SlimforgeError(
            f"the launcher started {world} processes but Accelerate runs {accelerator.num_processes} "
            f"({accelerator.distributed_type}); they would train without syncing gradients",
            "launch with a config from configs/accelerate/ (e.g. ddp.yaml) that matches this machine",
        )


def state_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names and bytes): equal digests mean identical replicas."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas_in_sync(model: nn.Module, accelerator) -> str:
    """Gathers every rank's state digest; raises if any rank's weights differ. Returns this rank's digest.

    This is a collective (all ranks must call it) and a CPU sync point; it runs once per epoch.
    """
    from accelerate.utils import DistributedType, gather_object

    digest = state_digest(accelerator.unwrap_model(model))
    replicated = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if accelerator.distributed_type in replicated and accelerator.num_processes > 1:
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
    from train.optim import build_optimizer, build_scheduler
    from train.task import DistillationTask, SupervisedTask

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
    optimizer = build_optimizer(student, cfg.optim)
    train_loader = build_loader(splits.train, cfg.data, is_training=True, seed=cfg.train.seed)
    val_loader = build_loader(splits.val, cfg.data, is_training=False)
    if len(train_loader) < 1:
        raise SlimforgeError(
            f"the training split has {len(splits.train)} images, fewer than one batch of {cfg.data.batch_size}",
            "lower data.batch_size or use more data",
        )
    student, optimizer, train_loader, val_loader = accelerator.prepare(student, optimizer, train_loader, val_loader)
    total_steps = cfg.train.epochs * len(train_loader)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    if teacher is not None:
        # Replicated on every rank, outside any wrapper: no gradient sync, no optimizer state, not saved.
        teacher = teacher.to(accelerator.device)
        task = DistillationTask(teacher, cfg.loss)
    else:
        task = SupervisedTask(cfg.loss)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        dump_yaml(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    if cfg.train.tensorboard:
        accelerator.init_trackers("slimforge", config={"distill": distill, "epochs": cfg.train.epochs})
    metrics = MetricsLog(out / "metrics.jsonl", accelerator)
    logger.info(
        "%s on %s: %d process(es) (%s), %d threads/process, micro-batch %d, global batch %d, %d steps, "
        "mixed precision %s",
        "distillation" if distill else "training",
        accelerator.device,
        accelerator.num_processes,
        accelerator.distributed_type,
        torch.get_num_threads(),
        cfg.data.batch_size,
        cfg.data.batch_size * accelerator.num_processes,
        total_steps,
        accelerator.mixed_precision,
    )

    seen: list[list[int]] = []
    history = []
    step, t_start, images = 0, time.perf_counter(), 0
    for epoch in range(cfg.train.epochs):
        student.train()
        seen.append([])
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not accelerator.is_main_process)
        for batch in bar:
            x, y = batch["pixel_values"], batch["label"]
            with accelerator.autocast():
                losses = task(student, x, y)
            accelerator.backward(losses["loss"])
            if cfg.optim.grad_clip is not None:
                accelerator.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            images += x.shape[0] * accelerator.num_processes
            if cfg.train.record_samples:
                seen[-1].extend(batch["index"].tolist())
            if step % cfg.train.log_every == 0 or step == total_steps:
                # .item() is a sync point; only paid every log_every steps.
                record = {k: v.item() for k, v in losses.items() if k != "logits"}
                record.update(step=step, epoch=epoch + 1, split="train", lr=scheduler.get_last_lr()[0])
                metrics.log(record, step)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
        val = evaluate(student, val_loader, accelerator)
        history.append(val["acc"])
        metrics.log(
            {"step": step, "epoch": epoch + 1, "split": "val", "val_acc": val["acc"], "val_loss": val["loss"]}, step
        )
        logger.info("epoch %d: val acc %.4f, val loss %.4f (%d images)", epoch + 1, val["acc"], val["loss"], val["n"])
        digest = check_replicas_in_sync(student, accelerator)
    elapsed = time.perf_counter() - t_start

    summary: dict[str, Any] = {
        "mode": "distill" if distill else "train",
        "model": f"{spec.source}:{spec.name}",
        "val_acc": history[-1],
        "val_acc_per_epoch": history,
        "epochs": cfg.train.epochs,
        "steps": step,
        "processes": accelerator.num_processes,
        "process_index": accelerator.process_index,
        "distributed_type": str(accelerator.distributed_type),
        "global_batch": cfg.data.batch_size * accelerator.num_processes,
        "train_seconds": round(elapsed, 2),
        "train_images_per_second": round(images / elapsed, 1),
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
