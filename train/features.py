"""Intermediate features of a model by layer name, for feature distillation.

A :class:`FeatureTap` registers forward hooks on named submodules (the names of ``model.named_modules()``, e.g.
``layer3`` of a timm/torchvision ResNet, ``stages.2`` of a ConvNeXt) and keeps each one's output of the latest
forward pass. Hooks work the same on any architecture and under DDP, DeepSpeed and FSDP wrappers (they sit on the
inner modules), which is why slimforge taps layers rather than rebuilding the model as a feature extractor.

Example:
    >>> import timm, torch
    >>> model = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    >>> tap = FeatureTap(model, ["layer3"], role="model")
    >>> _ = model(torch.zeros(2, 1, 32, 32))
    >>> tap.pop()["layer3"].shape
    torch.Size([2, 256, 2, 2])
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from slimforge.train.errors import ConfigError


def resolve_layer(model: nn.Module, name: str, role: str, field: str) -> nn.Module:
    """The submodule ``name`` of ``model``.

    Raises:
        ConfigError: no such layer; the message suggests the closest names and lists the top-level ones.
    """
    names = [n for n, _ in model.named_modules() if n]
    if name in names:
        return model.get_submodule(name)
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    top = [n for n in names if "." not in n]
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ConfigError(
        [f"{field}: the {role} has no layer {name!r}{hint}"],
        fix=f"name a module of the {role} as model.named_modules() lists it (top level: {', '.join(top[:12])})",
    )


class FeatureTap:
    """Keeps the outputs of ``model``'s layers ``names`` from its latest forward pass.

    Args:
        model: The bare model (hooks go on its submodules; wrap it afterwards if needed).
        names: Layer names as ``model.named_modules()`` gives them.
        role: ``"student"`` or ``"teacher"``, for messages.
        field: The config field that named the layers, for messages.

    Raises:
        ConfigError: a name is not a layer of ``model``.
    """

    def __init__(self, model: nn.Module, names: list[str], role: str = "model", field: str = "loss.hints") -> None:
        self.names = list(dict.fromkeys(names))
        self._out: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in self.names:
            module = resolve_layer(model, name, role, field)
            self._handles.append(module.register_forward_hook(self._keep(name)))

    def _keep(self, name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            self._out[name] = output

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """The features of the latest forward pass, ``{name: tensor}``, and forgets them (no reference is kept
        across steps). Raises KeyError naming a layer that did not run."""
        missing = [n for n in self.names if n not in self._out]
        if missing:
            raise KeyError(f"layers {missing} did not run in the last forward pass")
        out, self._out = self._out, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
