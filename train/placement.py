"""Where the frozen teacher lives on each rank (``train.teacher_placement``).

``replicated``: a full copy on every rank, outside any DDP/DeepSpeed/FSDP wrapper. No communication; memory per
rank = the whole teacher.

``sharded``: the teacher's parameters are split across the ranks with PyTorch FSDP2 (``fully_shard``), for
inference only: each forward all-gathers one unit (a group of layers) at a time and frees it again
(``reshard_after_forward``), so a rank holds ``1/world`` of the teacher plus the largest unit or two being
gathered. It needs only torch's default process group, so it is independent of how the student is wrapped
(DDP, DeepSpeed ZeRO-*, FSDP); it has been run on CPU (gloo) under DDP, ZeRO-2 and ZeRO-3, not yet on GPUs.
The price is an all-gather of the whole teacher per micro-batch on every rank.

``cached``: no teacher at all during distillation: its outputs for every training sample and epoch were computed
once by ``train/cache_teacher.py`` and are looked up by sample (:mod:`slimforge.train.teacher_cache`).

In the first two placements the teacher is frozen, runs under ``torch.no_grad``, never enters the optimizer and is never
written to a checkpoint or a resumable state (it is not handed to ``accelerator.prepare``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Placement = Literal["replicated", "sharded", "cached"]
TeacherDtype = Literal["fp32", "bf16"]

# A sharded teacher is split into about this many FSDP units (plus the root): the peak memory of a forward is
# the rank's shard plus roughly one or two gathered units (the one running and the one prefetched).
SHARD_UNITS = 16


class CastInputs(nn.Module):
    """Runs ``module`` (weights in ``dtype``) on inputs cast to ``dtype``: a bf16 teacher fed fp32 images."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images.to(self.dtype))


def place_teacher(
    teacher: nn.Module,
    placement: Placement,
    device: torch.device,
    world_size: int,
    dtype: TeacherDtype = "fp32",
    channels_last: bool = False,
) -> nn.Module:
    """Moves the frozen ``teacher`` to ``device``, sharding it across the default process group if asked.

    Args:
        teacher: The bare, frozen teacher (on CPU).
        placement: ``replicated`` or ``sharded``.
        device: This rank's device.
        world_size: Processes in the default process group (must be > 1 for ``sharded``; the engine checks).
        dtype: ``bf16`` holds the replicated teacher's weights in bf16 (half the memory, bf16 kernels) and feeds
            it bf16 images; a sharded teacher keeps fp32 shards and all-gathers them in bf16 (FSDP2's
            ``MixedPrecisionPolicy``: half the communication). Its logits are upcast by the KD loss.
        channels_last: Weights in channels_last (NHWC) memory format.

    Returns:
        The teacher, ready for ``teacher(images)`` on ``device`` (sharded: an FSDP2 module).

    Example:
        Inside a launched run with the default process group up (every rank calls it, then every forward is a
        collective: all ranks must run the teacher on the same number of batches)::

            teacher = place_teacher(freeze_(teacher), "sharded", accelerator.device, accelerator.num_processes)
            with torch.no_grad():
                logits = teacher(images)  # [B, num_classes]
    """
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    low = torch.bfloat16 if dtype == "bf16" else None
    if placement == "replicated":
        teacher = teacher.to(device)
        return CastInputs(teacher.to(low), low).eval() if low else teacher
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # cast_forward_inputs (the default) casts the images to the gathered dtype at the root.
    policy = MixedPrecisionPolicy(param_dtype=low) if low else MixedPrecisionPolicy()
    mesh = init_device_mesh(device.type, (world_size,))
    total = sum(p.numel() for p in teacher.parameters())
    min_params = max(1, total // SHARD_UNITS)

    def shard_units(module: nn.Module) -> int:
        """Post-order: a module becomes a unit once it holds ``min_params`` not yet in a unit below it."""
        pending = sum(p.numel() for p in module.parameters(recurse=False))
        for child in module.children():
            pending += shard_units(child)
        if module is not teacher and pending >= min_params:
            fully_shard(module, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
            return 0
        return pending

    shard_units(teacher)
    # The root holds what no unit took; fully_shard also moves the buffers (BatchNorm statistics) to the device.
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    return teacher
