"""The Accelerator for the launched topology, the checks that it is what the launcher asked for, the intra-op
threads of a CPU process, and the record of what took effect (logged at start and stored in ``summary.json``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slimforge.train.errors import SlimforgeError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from slimforge.train.schema import RunConfig, TrainConfig

logger = logging.getLogger(__name__)

# Variables only a launcher writes into the processes it starts: every `accelerate launch` launcher sets
# ACCELERATE_MIXED_PRECISION, torchrun sets TORCHELASTIC_RUN_ID. Both also set OMP_NUM_THREADS (to 1 by default)
# when the user did not.
LAUNCHER_MARKERS = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")
# Where launchers put the number of processes on this machine (torchrun, then MPI flavours, as Accelerate reads it).
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


def deepspeed_plugin(accelerator):
    """The launch's ``DeepSpeedPlugin`` (its ``deepspeed_config`` is the config DeepSpeed will get), or None."""
    return getattr(accelerator.state, "deepspeed_plugin", None)


def build_accelerator(cfg: TrainConfig, non_blocking: bool = False):
    """An ``Accelerator`` for the launched topology, on CPU (gloo) when no GPU is present.

    ``non_blocking``: host-to-device batch copies that do not wait (the loader must pin its memory).
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        GradientAccumulationPlugin,
        InitProcessGroupKwargs,
        TorchDynamoPlugin,
    )

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
        dataloader_config=DataLoaderConfiguration(non_blocking=non_blocking),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if cfg.compile_student else None,
    )
    if cfg.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    check_topology(accelerator, cfg)
    # Before any training compute and before the DataLoader's workers start (they run 1 thread each, torch's
    # default in workers); after the Accelerator, which may set its own count on MULTI_CPU.
    threads, _ = cpu_threads_rule(cfg.cpu_threads, accelerator.device.type == "cpu")
    if threads is not None:
        torch.set_num_threads(threads)
    return accelerator


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask (taskset, a container's cpuset), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_processes(environ: Mapping[str, str]) -> int:
    """How many processes of this launch share this machine: the launcher's local world size, else the whole
    world (never fewer than there are, so the cores are never oversubscribed)."""
    for name in LOCAL_SIZE_VARS:
        if environ.get(name, "").isdigit():
            return max(int(environ[name]), 1)
    return max(int(environ.get("WORLD_SIZE", "1")), 1)


def launcher_process() -> tuple[dict[str, str], list[str]] | None:
    """The environment the parent process was started with and its command line, or None where Linux ``/proc``
    cannot be read.

    ``/proc/<pid>/environ`` holds a process's environment as it was at exec: what the launcher added afterwards
    for its children (``accelerate launch``'s ``OMP_NUM_THREADS``) is not there.
    """
    parent = Path("/proc") / str(os.getppid())
    try:
        environ = (parent / "environ").read_bytes().decode(errors="replace")
        argv = (parent / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return None
    pairs = (item.partition("=") for item in environ.split("\0") if item)
    return {key: value for key, _, value in pairs}, argv.split("\0")


def omp_set_by_user(environ: Mapping[str, str], launcher: tuple[Mapping[str, str], list[str]] | None) -> bool | None:
    """Whether ``OMP_NUM_THREADS`` in ``environ`` is the user's rather than a launcher's default; None: cannot tell.

    ``accelerate launch`` writes ``OMP_NUM_THREADS`` into every process it starts (the user's value if exported or
    given as ``--num_cpu_threads_per_process``; else 1, or physical cores ÷ local processes on a ``--cpu`` launch)
    and leaves no marker of having done so; torchrun writes 1 for more than one process. So
    the value is the user's when no launcher started this process, when the launcher itself was started with it,
    or when the launcher's ``--num_cpu_threads_per_process`` flag gave it.

    Args:
        environ: This process's environment.
        launcher: The parent's start-up environment and command line (:func:`launcher_process`).
    """
    if "OMP_NUM_THREADS" not in environ:
        return False
    if not any(name in environ for name in LAUNCHER_MARKERS):
        return True
    if launcher is None:
        return None
    launcher_env, launcher_argv = launcher
    # argparse also takes an unambiguous prefix of the flag (--num_cpu ...).
    return "OMP_NUM_THREADS" in launcher_env or any(arg.startswith("--num_cpu") for arg in launcher_argv)


def plan_cpu_threads(
    configured: int | None,
    environ: Mapping[str, str],
    launcher: tuple[Mapping[str, str], list[str]] | None,
    cores: int,
) -> tuple[int | None, str]:
    """Intra-op threads for one process of a CPU run, and the rule that chose them (for the log).

    ``train.cpu_threads`` wins; else a user's ``OMP_NUM_THREADS`` is kept; else usable cores ÷ processes on this
    machine (at least 1), replacing a launcher's default.

    Args:
        configured: ``train.cpu_threads`` (None: automatic).
        environ: This process's environment.
        launcher: The parent's start-up environment and command line (:func:`launcher_process`).
        cores: Cores this process may run on (:func:`usable_cores`).

    Returns:
        The thread count to set (None: keep torch's, which it took from ``OMP_NUM_THREADS``) and why.

    Example:
        >>> plan_cpu_threads(None, {"OMP_NUM_THREADS": "1", "ACCELERATE_MIXED_PRECISION": "no"}, ({}, []), 8)
        (8, "8 usable cores ÷ 1 local process; OMP_NUM_THREADS=1 is the launcher's default, not the user's")
    """
    if configured is not None:
        return configured, f"train.cpu_threads={configured}"
    omp = environ.get("OMP_NUM_THREADS")
    user = omp_set_by_user(environ, launcher)
    if user:
        return None, (
            f"OMP_NUM_THREADS={omp} set by the user (exported, or the launcher's --num_cpu_threads_per_process); "
            "train.cpu_threads overrides it"
        )
    if user is None:
        return None, (
            f"OMP_NUM_THREADS={omp} kept: the launcher's environment cannot be read to tell the user's value from "
            "the launcher's default; set train.cpu_threads to choose"
        )
    local = local_processes(environ)
    why = "OMP_NUM_THREADS unset" if omp is None else f"OMP_NUM_THREADS={omp} is the launcher's default, not the user's"
    return max(cores // local, 1), f"{cores} usable cores ÷ {local} local process{'es' if local > 1 else ''}; {why}"


def cpu_threads_rule(configured: int | None, on_cpu: bool) -> tuple[int | None, str]:
    """:func:`plan_cpu_threads` for this process; a GPU run keeps torch's threads (None)."""
    if not on_cpu:
        return None, "GPU run: torch's default, left as it is"
    return plan_cpu_threads(configured, os.environ, launcher_process(), usable_cores())


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
        # Recomputed, not remembered: the same environment gives the rule build_accelerator applied.
        "threads_rule": cpu_threads_rule(cfg.train.cpu_threads, accelerator.device.type == "cpu")[1],
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
        "speed": speed_options(accelerator, cfg),
        "ranks": gather_object([rank]),
    }


def speed_options(accelerator, cfg: RunConfig) -> dict[str, Any]:
    """The input-pipeline and compute options in effect (GPU-oriented; most are no-ops on the CPU)."""
    d, t = cfg.data, cfg.train
    workers = d.num_workers
    return {
        "loader_workers_per_rank": workers,
        "pin_memory": accelerator.dataloader_config.non_blocking,
        "non_blocking_copies": accelerator.dataloader_config.non_blocking,
        "persistent_workers": d.persistent_workers and workers > 0,
        "prefetch_factor": (d.prefetch_factor or 2) if workers > 0 else None,
        "channels_last": t.channels_last,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "compile_student": t.compile_student,
        "compile_teacher": t.compile_teacher,
        "teacher_dtype": t.teacher_dtype,
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
    logger.info("speed options: %s", ", ".join(f"{k} {v}" for k, v in topology["speed"].items()))
    for r in topology["ranks"]:
        logger.info(
            "rank %d (local %d) on %s: device %s, %d intra-op threads (%s), collective timeout %s s",
            r["rank"],
            r["local_rank"],
            r["host"],
            r["device"],
            r["threads"],
            r["threads_rule"],
            r["collective_timeout_s"],
        )
