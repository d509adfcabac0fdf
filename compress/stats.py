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
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
