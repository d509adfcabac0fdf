"""Replica consistency: a digest of the trained weights, compared across ranks once per epoch."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from slimforge.train.engine.topology import deepspeed_plugin
from slimforge.train.errors import SlimforgeError


def state_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and every activation quantizer's state (names and bytes): equal digests mean
    identical trained weights and identical quantisation scales.

    Other buffers are left out on purpose: BatchNorm running statistics are per-rank under DeepSpeed (DDP
    broadcasts rank 0's before each forward), and they are not what gradient synchronisation keeps equal. The
    quantizers' ranges are: their observers reduce each batch's range across ranks.
    """
    from slimforge.compress.quantize.fakequant import ActivationQuantizer

    tensors = dict(model.named_parameters())
    for prefix, m in model.named_modules():
        if isinstance(m, ActivationQuantizer):
            tensors.update({f"{prefix}.{k}": v for k, v in m.named_buffers()})
    from torch.distributed.tensor import DTensor

    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        if isinstance(t, DTensor):  # FSDP2 (digested with one process only, where the shard is the whole tensor)
            t = t.full_tensor()
        # A copy: a NumPy view would pin the parameter's storage, which FSDP frees and reallocates.
        h.update(t.detach().to("cpu", copy=True).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas_in_sync(model: nn.Module, accelerator) -> str:
    """Gathers every rank's state digest; raises if any rank's weights differ. Returns this rank's digest.

    This is a collective (all ranks must call it) and a CPU sync point; it runs once per epoch.
    """
    from accelerate.utils import DistributedType, gather_object

    plugin = deepspeed_plugin(accelerator)
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
