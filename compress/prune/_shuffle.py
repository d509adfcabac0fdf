"""Layers whose channels Torch-Pruning's dependency graph cannot follow, found before it is built.

A reshape that splits or merges the channel axis of a feature map (the channel shuffle of ShuffleNet:
``[B, C, H, W] -> [B, g, C/g, H, W] -> transpose -> [B, C, H, W]``) interleaves channels of different groups; the
dependency graph maps indices through it with a stride of ``in_channels // out_channels`` and crashes
(``ZeroDivisionError``) or couples the wrong channels. Such a network is refused by layer name instead.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

_RESHAPES = {"view", "reshape", "unflatten", torch.reshape, torch.unflatten}


def _owner(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), None) if stack else None
    name = path[0] if isinstance(path, tuple) else path
    return str(name) if name else "the model's own forward"


def channel_reshapes(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the layers whose forward reshapes the channel axis of a ``[B, C, H, W]`` feature map into another
    (a flatten to ``[B, features]`` is not one). Empty when there is none or the model cannot be traced."""
    try:
        gm = fx.symbolic_trace(copy.deepcopy(model).eval())
        ShapeProp(gm).propagate(example)
    except Exception:  # untraceable: Torch-Pruning's own graph (or its error) decides
        return []
    found: list[str] = []
    for n in gm.graph.nodes:
        if n.target not in _RESHAPES or not isinstance(n.args[0], fx.Node):
            continue
        before, after = n.args[0].meta.get("tensor_meta"), n.meta.get("tensor_meta")
        if before is None or after is None or not hasattr(before, "shape") or not hasattr(after, "shape"):
            continue
        if len(before.shape) == 4 and len(after.shape) > 2 and after.shape[1] != before.shape[1]:
            name = _owner(n)
            if name not in found:
                found.append(name)
    return found
