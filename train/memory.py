"""Bytes of model and optimizer state a rank holds: what ZeRO/FSDP sharding is supposed to divide."""

from __future__ import annotations

import torch
from torch import nn

# DeepSpeed ZeRO keeps its own FP32 partitions of the parameters next to the wrapped torch optimizer.
_ZERO_PARTITIONS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups")


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _local(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank stores: ZeRO-3's ``ds_tensor``, an FSDP2 DTensor's local shard."""
    local = getattr(p, "ds_tensor", None)
    if local is not None:
        return local
    return p.to_local() if hasattr(p, "to_local") else p


def param_bytes(model: nn.Module) -> int:
    """Bytes of parameters resident on this rank (sharded parameters count their local shard)."""
    return _nbytes(_local(p) for p in model.parameters())


def state_memory(model: nn.Module, optimizer) -> dict[str, int]:
    """Parameter and optimizer-state bytes resident on this rank.

    Args:
        model: The bare (unwrapped) model; sharded parameters count their local shard.
        optimizer: The optimizer as prepared by Accelerate (wrappers are walked down to the torch optimizer).

    Returns:
        ``{"param_bytes", "optimizer_bytes"}``; optimizer bytes count the torch optimizer's state tensors plus
        DeepSpeed's FP32 partitions, each storage once.
    """
    params = param_bytes(model)
    tensors, level, depth = [], optimizer, 0
    while level is not None and depth < 6:
        if isinstance(level, torch.optim.Optimizer):
            tensors.extend(v for state in level.state.values() for v in state.values())
        for attr in _ZERO_PARTITIONS:
            tensors.extend(getattr(level, attr, None) or [])
        nxt = getattr(level, "optimizer", None)
        level, depth = (nxt if nxt is not level else None), depth + 1
    return {"param_bytes": params, "optimizer_bytes": _nbytes(tensors)}
