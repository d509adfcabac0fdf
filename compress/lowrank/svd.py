"""``lowrank``: each chosen layer becomes two thinner ones from its truncated SVD, when that saves MACs.

A ``Linear`` ``W [out, in]`` becomes ``Linear(in, r) → Linear(r, out)`` with ``W ≈ U_r S_r V_r^T`` (each
factor takes ``sqrt(S_r)``). A ``Conv2d`` ``W [out, in, kh, kw]`` is factorised over channels (Zhang et al.,
2016, "Accelerating very deep convolutional networks"): ``W`` reshaped to ``[out, in·kh·kw]`` gives a ``kh×kw``
convolution to ``r`` channels followed by a ``1×1`` convolution to ``out``, with the original stride, padding and
bias. Grouped (depthwise) convolutions are left alone.

The rank of a layer is the smallest that keeps ``energy`` of the squared singular values, or ``rank_ratio`` of
the full rank; a layer is only replaced when its factorised form has fewer MACs. The ranks are the step's record:
a fresh process rebuilds the same factorised structure from them, without data, before the weights load.
Recovering the accuracy is a distillation run with the factorised checkpoint as the student.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from slimforge.compress.api import CompressionContext, Method, MethodConfig, RecipeError, register_method


@dataclass
class LowRankConfig(MethodConfig):
    """Which layers to factorise and how far."""

    energy: float | None = 0.9
    """Keep the smallest rank whose singular values hold this share of the layer's squared Frobenius norm."""
    rank_ratio: float | None = None
    """Instead of ``energy``: keep this share of each layer's full rank."""
    layers: list[str] = field(default_factory=lambda: ["*"])
    """fnmatch patterns of the layer names to consider (Linear and non-grouped Conv2d)."""
    skip: list[str] = field(default_factory=list)
    """fnmatch patterns of layer names never factorised (e.g. the stem or the classifier)."""

    def validate(self) -> list[str]:
        p = []
        if (self.energy is None) == (self.rank_ratio is None):
            p.append("energy/rank_ratio: set exactly one of them (the other null)")
        if self.energy is not None and not 0 < self.energy <= 1:
            p.append(f"energy: {self.energy} must be in (0, 1]")
        if self.rank_ratio is not None and not 0 < self.rank_ratio <= 1:
            p.append(f"rank_ratio: {self.rank_ratio} must be in (0, 1]")
        return p


def _matrix(m: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in·k·k]``."""
    return m.weight.detach().flatten(1)


def _factorized(m: nn.Module, rank: int) -> nn.Sequential:
    """The two-layer replacement of ``m`` at ``rank`` (weights uninitialised)."""
    if isinstance(m, nn.Linear):
        return nn.Sequential(
            nn.Linear(m.in_features, rank, bias=False), nn.Linear(rank, m.out_features, m.bias is not None)
        )
    first = nn.Conv2d(m.in_channels, rank, m.kernel_size, m.stride, m.padding, m.dilation, bias=False)
    return nn.Sequential(first, nn.Conv2d(rank, m.out_channels, 1, bias=m.bias is not None))


def _macs_per_position(m: nn.Module, rank: int | None) -> int:
    rows, cols = _matrix(m).shape
    return rows * cols if rank is None else rank * (rows + cols)


@register_method("lowrank", LowRankConfig)
class LowRank(Method):
    """Truncated-SVD factorisation of linear and convolution layers."""

    config: LowRankConfig

    def _candidates(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        cfg = self.config
        chosen = []
        for name, m in model.named_modules():
            plain = type(m) in (nn.Linear, nn.Conv2d) or (isinstance(m, nn.Linear) and type(m).__name__ == "Linear")
            if not plain or (isinstance(m, nn.Conv2d) and m.groups != 1):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in cfg.layers) and not any(
                fnmatch.fnmatchcase(name, p) for p in cfg.skip
            ):
                chosen.append((name, m))
        return chosen

    def _rank(self, s: torch.Tensor) -> int:
        if self.config.rank_ratio is not None:
            return max(1, math.ceil(self.config.rank_ratio * len(s)))
        energy = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum().clamp(min=1e-30)
        return int(torch.searchsorted(energy, torch.tensor(self.config.energy, dtype=torch.float64)).item()) + 1

    @torch.no_grad()
    def prepare(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        ranks = {}
        for name, m in self._candidates(model):
            u, s, vh = torch.linalg.svd(_matrix(m).double(), full_matrices=False)
            rank = min(self._rank(s), len(s))
            if _macs_per_position(m, rank) >= _macs_per_position(m, None):
                continue  # no saving at this rank: keep the layer whole
            root = s[:rank].sqrt()
            new = _factorized(m, rank)
            new[0].weight.copy_((root[:, None] * vh[:rank]).reshape(new[0].weight.shape).float())
            new[1].weight.copy_((u[:, :rank] * root[None, :]).reshape(new[1].weight.shape).float())
            if m.bias is not None:
                new[1].bias.copy_(m.bias)
            _replace(model, name, new.to(m.weight.device))
            ranks[name] = rank
        self.record = {"ranks": ranks}
        return model

    def rebuild(self, model: nn.Module) -> nn.Module:
        modules = dict(model.named_modules())
        for name, rank in self.record.get("ranks", {}).items():
            if name not in modules or not isinstance(modules[name], (nn.Linear, nn.Conv2d)):
                raise RecipeError(
                    f"lowrank recorded layer {name!r}, which this architecture does not have as Linear/Conv2d",
                    "load the checkpoint with the architecture and library version that wrote it",
                )
            _replace(model, name, _factorized(modules[name], int(rank)))
        return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
