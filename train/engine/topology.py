"""The Accelerator for the launched topology, the checks that it is what the launcher asked for, and the record of
what took effect (logged at start and stored in ``summary.json``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slimforge.train.errors import SlimforgeError

if TYPE_CHECKING:
    from slimforge.train.schema import RunConfig, TrainConfig

logger = logging.getLogger(__name__)


def deepspeed_plugin(accelerator):
    """The launch's ``DeepSpeedPlugin`` (its ``deepspeed_config`` is the config DeepSpeed will get), or None."""
    return getattr(accelerator.state, "deepspeed_plugin", None)


def build_accelerator(cfg: TrainConfig):
    """An ``Accelerator`` for the launched topology, on CPU (gloo) when no GPU is present."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    from slimforge.train.engine.outputs import cuda_unusable_reason

    broken = None if cfg.cpu else cuda_unusable_reason()
    if broken is not None:
        raise SlimforgeError(
            f"{broken}: this run would train on the CPU instead",
            "fix the node's CUDA setup (nvidia-smi works, torch.cuda.is_available() is True: a torch build for the "
            "driver's CUDA version), or set train.cpu=true to train on the CPU on purpose",
        )
    on_cpu = cfg.cpu or not torch.cuda.is_available()
    if on_cpu and cfg.mixed_precision == "fp16":
        raise SlimforgeError(
            "train.mixed_precision=fp16 needs a GPU, and this run is on CPU",
            "use train.mixed_precision=bf16 (CPU autocast) or no",
        )
    # Without an explicit gloo backend on CPU, DeepSpeed launches see num_processes=1 while the world is 2
    # ; DDP on CPU picks gloo either way.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    timeout = timedelta(seconds=cfg.collective_timeout_s)
    handlers = [InitProcessGroupKwargs(backend="gloo" if on_cpu and multi_process else "nccl", timeout=timeout)]
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
    """Stops a run whose topology is not what the launcher asked for (some are silent, see docs/distributed.md).

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
    plugin = deepspeed_plugin(accelerator)
    if plugin is not None:
        ds_accum = plugin.deepspeed_config.get("gradient_accumulation_steps")
        if ds_accum not in (None, "auto", cfg.grad_accum_steps):
            raise SlimforgeError(
                f"train.grad_accum_steps is {cfg.grad_accum_steps} but the DeepSpeed launch config says "
                f"gradient_accumulation_steps: {ds_accum}",
                f"set train.grad_accum_steps={ds_accum} or change the launch config",
            )


def set_gradient_clipping(accelerator, grad_clip: float | None) -> None:
    """Makes DeepSpeed clip exactly as ``optim.grad_clip`` says (it clips inside its own step; Accelerate's
    ``clip_grad_norm_`` does nothing under DeepSpeed).

    A DeepSpeed launch config without ``gradient_clipping`` leaves it "auto", which Accelerate fills with 1.0 when it
    prepares the engine: every ZeRO run would clip at norm 1 whatever the run config says, and train differently
    from a DDP run of the same config. This writes the configured value (0.0, DeepSpeed's "off", for null) before
    that happens, and refuses a launch config that pins another value.

    Raises:
        SlimforgeError: the launch config's ``gradient_clipping`` differs from ``optim.grad_clip``.
    """
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return
    wanted = float(grad_clip) if grad_clip is not None else 0.0
    pinned = plugin.deepspeed_config.get("gradient_clipping", "auto")
    if pinned not in ("auto", None) and float(pinned) != wanted:
        raise SlimforgeError(
            f"the DeepSpeed launch config clips gradients at {pinned}, the run config says optim.grad_clip={grad_clip}",
            "remove gradient_clipping from the launch config (the run config decides) or set optim.grad_clip to it",
        )
    plugin.deepspeed_config["gradient_clipping"] = wanted


def _collective_timeout(device: torch.device) -> float | None:
    """The timeout the default process group really runs with, in seconds (None without one, or where this torch
    does not expose it)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    try:
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device(device.type))
        return backend.options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return None


def describe_topology(accelerator, cfg: RunConfig) -> dict[str, Any]:
    """What took effect, gathered from every rank (a collective), for the log and summary.json."""
    import socket

    from accelerate.utils import gather_object

    plugin = deepspeed_plugin(accelerator)
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
        "collective_timeout_s": _collective_timeout(accelerator.device),
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
        "grad_clip": cfg.optim.grad_clip,
        "clipped_by": "DeepSpeed" if plugin is not None else "Accelerate (clip_grad_norm_)",
        "teacher_placement": cfg.train.teacher_placement,
        "collective_timeout_s": cfg.train.collective_timeout_s,
        "ranks": gather_object([rank]),
    }


def log_topology(topology: dict[str, Any], cfg: RunConfig, lr: float, total_steps: int, distill: bool) -> None:
    """Logs what took effect: one line for the run, one per rank."""
    logger.info(
        "%s: %s, world size %d, micro-batch %d/rank × %d accumulation = global batch %d, sharding %s, "
        "mixed precision %s (%s; weights %s, master weights %s), optimizer %s, gradient clipping %s (%s), teacher %s, "
        "peak LR %.3g (%s scaling from %g at batch %d), "
        "%d updates",
        "distillation" if distill else "training",
        topology["distributed_type"],
        topology["world_size"],
        topology["micro_batch_per_rank"],
        topology["grad_accum_steps"],
        topology["global_batch"],
        topology["sharding"],
        topology["mixed_precision"],
        topology["precision_mode"],
        topology["weights"],
        topology["master_weights"],
        topology["optimizer"],
        topology["grad_clip"] if topology["grad_clip"] is not None else "none",
        topology["clipped_by"],
        topology["teacher_placement"] if distill else "none",
        lr,
        cfg.optim.lr_scaling,
        cfg.optim.lr,
        cfg.optim.reference_batch,
        total_steps,
    )
    for r in topology["ranks"]:
        logger.info(
            "rank %d (local %d) on %s: device %s, %d threads, collective timeout %s s",
            r["rank"],
            r["local_rank"],
            r["host"],
            r["device"],
            r["threads"],
            r["collective_timeout_s"],
        )
