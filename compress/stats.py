"""Model size and cost: parameter count and multiply-accumulates (MACs) measured by torch's FLOP counter."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _cpu_attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:  # shapes, not tensors
    """FLOPs of CPU scaled-dot-product attention (q·kᵀ and attention·v), by torch's formula for the GPU kernels."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


# torch's flop counter knows the GPU attention kernels only: the CPU one (what timm's ViTs call on a CPU) counted 0.
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_macs(model: nn.Module, input_size: tuple[int, ...] | list[int]) -> int:
    """Multiply-accumulates of one forward pass at batch 1.

    Args:
        model: The model; it is run once in eval mode on zeros of shape ``[1, *input_size]``, on the device of its
            parameters.
        input_size: ``[C, H, W]``.

    Returns:
        MACs = FLOPs / 2 as counted by ``torch.utils.flop_counter`` (convolutions, matmuls, attention; cheap
        elementwise ops are not counted, matching how MACs are usually quoted).
    """
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
        with counter, torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
