"""``lowrank``: each chosen layer becomes thinner ones from a truncated decomposition, when that saves MACs.

A ``Linear`` ``W [out, in]`` becomes ``Linear(in, r) → Linear(r, out)`` with ``W ≈ U_r S_r V_r^T`` (each
factor takes ``sqrt(S_r)``). A ``Conv2d`` ``W [out, in, kh, kw]`` is factorised one of two ways (``conv``):

* ``channel`` (Zhang et al., 2016, "Accelerating very deep convolutional networks"): ``W`` reshaped to
  ``[out, in·kh·kw]`` gives a ``kh×kw`` convolution to ``r`` channels followed by a ``1×1`` convolution to ``out``;
* ``tucker2`` (Kim et al., 2016): a ``1×1`` projection to ``r_in`` channels, the ``kh×kw`` core to ``r_out``, and a
  ``1×1`` expansion to ``out`` (:mod:`slimforge.compress.lowrank.tucker`); a ``1×1`` convolution is a matrix, so it
  takes the SVD in both modes.

The stride, padding, dilation and bias are kept; grouped (depthwise) convolutions are left alone.

The ranks of a layer are the smallest that keep ``energy`` of its squared singular values (of each unfolding, for
Tucker-2), or ``rank_ratio`` of the full rank, or, for a target share of the model's MACs (``macs``), those of the one
energy threshold shared by every layer that lands at or under the target. A layer is only replaced when its
factorised form has fewer MACs at the example input's size. What is recorded is each replaced layer's ranks
(``{"ranks": {name: r}, "tucker2": {name: {"out": r_out, "in": r_in}}}``): a fresh process rebuilds the same
structure from them, without data, before the weights load (a record with ``ranks`` only, as earlier versions wrote,
rebuilds as it did). Recovering the accuracy is a distillation run with the factorised checkpoint as the student.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from slimforge.compress.api import CompressionContext, Method, MethodConfig, RecipeError, register_method
from slimforge.compress.lowrank.tucker import mode_svd, tucker2_factorize, tucker2_layers, tucker2_macs
from slimforge.compress.stats import count_macs

logger = logging.getLogger(__name__)

DEFAULT_ENERGY = 0.9


@dataclass
class LowRankConfig(MethodConfig):
    """Which layers to factorise, how, and how far. Exactly one of ``energy``, ``rank_ratio`` and ``macs`` is set."""

    energy: float | None = None
    """Keep the smallest rank whose singular values hold this share of the layer's squared Frobenius norm
    (0.9 when neither ``rank_ratio`` nor ``macs`` is given)."""
    rank_ratio: float | None = None
    """Instead of ``energy``: keep this share of each layer's full rank."""
    macs: float | None = None
    """Instead of ``energy``: the share of the MACs of the model this step receives to keep (0.5: half), at the
    example input's size. One energy threshold for every layer, the largest that lands at or under the target; a
    result more than 3% under it is refused, naming the rank step that jumps past it."""
    conv: Literal["channel", "tucker2"] = "channel"
    """How a ``kh×kw`` convolution is factorised: ``channel`` (a ``kh×kw`` convolution to ``r`` channels, then a
    ``1×1``) or ``tucker2`` (a ``1×1`` projection, a thin ``kh×kw`` core, a ``1×1`` expansion)."""
    layers: list[str] = field(default_factory=lambda: ["*"])
    """fnmatch patterns of the layer names to consider (Linear and non-grouped Conv2d)."""
    skip: list[str] = field(default_factory=list)
    """fnmatch patterns of layer names never factorised (e.g. the stem or the classifier)."""

    def __post_init__(self) -> None:
        if self.energy is None and self.rank_ratio is None and self.macs is None:
            self.energy = DEFAULT_ENERGY

    def validate(self) -> list[str]:
        p = []
        if sum(v is not None for v in (self.energy, self.rank_ratio, self.macs)) != 1:
            p.append("energy/rank_ratio/macs: set exactly one of them (the others null)")
        if self.energy is not None and not 0 < self.energy <= 1:
            p.append(f"energy: {self.energy} must be in (0, 1]")
        if self.rank_ratio is not None and not 0 < self.rank_ratio <= 1:
            p.append(f"rank_ratio: {self.rank_ratio} must be in (0, 1]")
        if self.macs is not None and not 0 < self.macs < 1:
            p.append(f"macs: {self.macs} must be in (0, 1), the share of MACs kept")
        return p


def _matrix(m: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in·kh·kw]``."""
    return m.weight.detach().flatten(1)


def _factorized(m: nn.Module, rank: int) -> nn.Sequential:
    """The two-layer SVD replacement of ``m`` at ``rank`` (weights uninitialised)."""
    if isinstance(m, nn.Linear):
        return nn.Sequential(
            nn.Linear(m.in_features, rank, bias=False), nn.Linear(rank, m.out_features, m.bias is not None)
        )
    first = nn.Conv2d(
        m.in_channels, rank, m.kernel_size, m.stride, m.padding, m.dilation, bias=False, padding_mode=m.padding_mode
    )
    return nn.Sequential(first, nn.Conv2d(rank, m.out_channels, 1, bias=m.bias is not None))


@torch.no_grad()
def svd_factorize(
    layer: nn.Linear | nn.Conv2d, rank: int, usv: tuple[torch.Tensor, ...] | None = None
) -> nn.Sequential:
    """``layer`` replaced by its rank-``rank`` SVD factorisation, on its device and in its dtype.

    Args:
        layer: A ``Linear`` or non-grouped ``Conv2d`` with ``W [out, in(, kh, kw)]``.
        rank: ``1 <= rank <= min(out, in·kh·kw)``.
        usv: ``(U, S, V^T)`` of ``W [out, in·kh·kw]`` in float64, when already computed.

    Returns:
        ``Sequential(first, second)``: ``first`` holds ``sqrt(S_r) V_r^T`` (``[r, in(, kh, kw)]``, the original
        stride, padding and dilation), ``second`` holds ``U_r sqrt(S_r)`` (``[out, r(, 1, 1)]``) and the bias.

    Example:
        >>> pair = svd_factorize(nn.Linear(64, 32), 8)
        >>> [tuple(p.weight.shape) for p in pair]
        [(8, 64), (32, 8)]
    """
    u, s, vh = usv if usv is not None else _svd(_matrix(layer).double())
    root = s[:rank].sqrt()  # each factor takes half of the spectrum: both end up on the same scale
    new = _factorized(layer, rank).to(device=layer.weight.device, dtype=layer.weight.dtype)
    new[0].weight.copy_((root[:, None] * vh[:rank]).reshape(new[0].weight.shape))
    new[1].weight.copy_((u[:, :rank] * root[None, :]).reshape(new[1].weight.shape))
    if layer.bias is not None:
        new[1].bias.copy_(layer.bias)
    return new


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U [m, k], S [k], V^T [k, n])`` of ``matrix [m, n]``, ``k = min(m, n)``.

    LAPACK was about 10x slower on a wide matrix than on its transpose (``[512, 4608]`` in float64: 10 s against 1 s
    on 2 cores), so a wide one is decomposed transposed."""
    if matrix.shape[0] >= matrix.shape[1]:
        return tuple(torch.linalg.svd(matrix, full_matrices=False))
    v, s, uh = torch.linalg.svd(matrix.T, full_matrices=False)
    return uh.T, s, v.T


def _energy_rank(cumulative: torch.Tensor, energy: float) -> int:
    """The smallest rank whose share of the squared singular values (``cumulative [k]``, rising to 1) is ≥
    ``energy``."""
    target = torch.tensor(energy, dtype=cumulative.dtype)
    return min(int(torch.searchsorted(cumulative, target).item()) + 1, len(cumulative))


@dataclass
class _Layer:
    """A layer that may be factorised: its decomposition, its spectra and what each choice of ranks costs."""

    name: str
    module: nn.Module
    kind: Literal["svd", "tucker2"]
    factors: tuple[torch.Tensor, ...]
    """``svd``: ``(U, S, V^T)`` of ``[out, in·kh·kw]``; ``tucker2``: ``(U_0, S_0, U_1, S_1)`` of the two unfoldings."""
    in_positions: int
    """Input pixels (tokens for a Linear) per sample, summed over the layer's calls in one forward pass."""
    out_positions: int

    @property
    def spectra(self) -> list[torch.Tensor]:
        return [self.factors[1]] if self.kind == "svd" else [self.factors[1], self.factors[3]]

    @property
    def cumulative(self) -> list[torch.Tensor]:
        """Per spectrum, the share of the squared singular values kept at each rank ``[k]``."""
        return [torch.cumsum(s**2, 0) / (s**2).sum().clamp(min=1e-30) for s in self.spectra]

    def dense_macs(self) -> int:
        rows, cols = _matrix(self.module).shape
        return self.out_positions * rows * cols

    def macs(self, ranks: tuple[int, ...]) -> int:
        if self.kind == "tucker2":
            return tucker2_macs(self.module, *ranks, self.in_positions, self.out_positions)
        rows, cols = _matrix(self.module).shape
        return self.out_positions * ranks[0] * (rows + cols)

    def saving(self, ranks: tuple[int, ...]) -> int:
        """MACs saved by factorising at ``ranks`` (0 when the factorised form would cost as much or more)."""
        return max(0, self.dense_macs() - self.macs(ranks))

    def factorize(self, ranks: tuple[int, ...]) -> nn.Module:
        m = self.module
        if self.kind == "tucker2":
            return tucker2_factorize(m, *ranks, hosvd=(self.factors[0], self.factors[2]))
        return svd_factorize(m, ranks[0], self.factors)


@register_method("lowrank", LowRankConfig)
class LowRank(Method):
    """Truncated-SVD or Tucker-2 factorisation of linear and convolution layers."""

    config: LowRankConfig

    def _candidates(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        cfg = self.config
        chosen = []
        for name, m in model.named_modules():
            # Exact types: subclasses (fake-quant layers, attention's out_proj, Conv2dSame) read .weight themselves.
            plain = type(m) in (nn.Linear, nn.Conv2d) or (isinstance(m, nn.Linear) and type(m).__name__ == "Linear")
            if not plain or (isinstance(m, nn.Conv2d) and m.groups != 1):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in cfg.layers) and not any(
                fnmatch.fnmatchcase(name, p) for p in cfg.skip
            ):
                chosen.append((name, m))
        return chosen

    @torch.no_grad()
    def _layers(self, model: nn.Module, example: torch.Tensor) -> list[_Layer]:
        """The candidates the example's forward pass runs, with their positions and decompositions."""
        candidates = dict(self._candidates(model))
        positions: dict[str, list[int]] = {}
        batch = example.shape[0]

        def hook(name: str):
            def record(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
                width = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)
                seen = positions.setdefault(name, [0, 0])
                seen[0] += args[0].numel() // (batch * width[0])
                seen[1] += out.numel() // (batch * width[1])

            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in candidates.items()]
        was_training = model.training
        try:
            model.eval()  # batch norm must not update its running statistics on the example
            model(example)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        layers = []
        for name, m in candidates.items():
            if name not in positions:
                continue  # not run on this input: factorising it saves nothing
            is_1x1 = isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
            if isinstance(m, nn.Conv2d) and not is_1x1 and self.config.conv == "tucker2":
                u0, s0 = mode_svd(m.weight, 0)
                u1, s1 = mode_svd(m.weight, 1)
                layers.append(_Layer(name, m, "tucker2", (u0, s0, u1, s1), *positions[name]))
            else:
                layers.append(_Layer(name, m, "svd", _svd(_matrix(m).double()), *positions[name]))
        return layers

    def _fixed_ranks(self, layer: _Layer) -> tuple[int, ...]:
        if self.config.rank_ratio is not None:
            return tuple(max(1, math.ceil(self.config.rank_ratio * len(s))) for s in layer.spectra)
        return tuple(_energy_rank(c, self.config.energy) for c in layer.cumulative)

    def _ranks_for_macs(self, layers: list[_Layer], before: int) -> tuple[dict[str, tuple[int, ...]], float, int]:
        """The ranks of the largest shared energy threshold whose model keeps at most ``macs`` of ``before``.

        Returns:
            ``(ranks by layer name, the threshold, the predicted MACs)``.

        Raises:
            RecipeError: rank 1 everywhere still costs more, or the next rank step jumps more than 3% past the target.
        """
        cfg = self.config
        target = cfg.macs * before
        cumulative = {lay.name: lay.cumulative for lay in layers}

        def ranks_at(energy: float) -> dict[str, tuple[int, ...]]:
            return {lay.name: tuple(_energy_rank(c, energy) for c in cumulative[lay.name]) for lay in layers}

        def total(energy: float) -> int:
            ranks = ranks_at(energy)
            return before - sum(lay.saving(ranks[lay.name]) for lay in layers)

        # Every layer's ranks change only where the threshold crosses one of its cumulative shares, and the model's
        # MACs never fall as the threshold rises (a layer past its break-even rank is kept whole): bisect over them.
        points = torch.unique(torch.cat([c for cs in cumulative.values() for c in cs])) if layers else torch.ones(1)
        lowest = total(points[0].item())
        if lowest > target:
            raise RecipeError(
                f"lowrank reached {lowest / before:.1%} of the MACs at rank 1, not the {cfg.macs:.0%} asked for: the "
                f"other layers are kept whole (not matched by layers/skip, grouped, or no saving when factorised)",
                "factorise more layers (layers: [...], skip: [...]), use conv: tucker2, or ask for a larger macs",
            )
        lo, hi = 0, len(points) - 1  # total(points[lo]) <= target; find the last index where that holds
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if total(points[mid].item()) <= target:
                lo = mid
            else:
                hi = mid - 1
        energy = points[lo].item()
        landed = total(energy)
        if landed < 0.97 * target:
            above = total(points[lo + 1].item()) if lo + 1 < len(points) else before
            raise RecipeError(
                f"lowrank's ranks step from {landed / before:.1%} to {above / before:.1%} of the MACs, past the "
                f"{cfg.macs:.0%} asked for (at most 3% under it): one layer's next rank costs that much",
                f"ask for a macs outside that step, or skip that layer (skip: [...]), or set energy: {energy:.4g}",
            )
        return ranks_at(energy), energy, landed

    @torch.no_grad()
    def prepare(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        cfg = self.config
        device = next(model.parameters()).device  # the bare model, where the engine built it (before any wrapper)
        example = ctx.example_input.to(device)
        layers = self._layers(model, example)
        record: dict[str, Any] = {"ranks": {}, "tucker2": {}}
        if cfg.macs is not None:
            before = count_macs(model, tuple(example.shape[1:]))
            ranks, energy, predicted = self._ranks_for_macs(layers, before)
        else:
            ranks = {lay.name: self._fixed_ranks(lay) for lay in layers}
        for lay in layers:
            if not lay.saving(ranks[lay.name]):
                continue  # no saving at these ranks: keep the layer whole
            _replace(model, lay.name, lay.factorize(ranks[lay.name]))
            if lay.kind == "tucker2":
                record["tucker2"][lay.name] = dict(zip(("out", "in"), ranks[lay.name], strict=True))
            else:
                record["ranks"][lay.name] = ranks[lay.name][0]
        if cfg.macs is not None:
            after = count_macs(model, tuple(example.shape[1:]))
            if not 0.97 * cfg.macs * before <= after <= cfg.macs * before:
                raise RecipeError(
                    f"lowrank planned {predicted / before:.1%} of the MACs for the {cfg.macs:.0%} asked for and the "
                    f"factorised model counts {after / before:.1%}: a layer's cost is not what its input and output "
                    "sizes say (its weight used elsewhere too, or a forward pass that depends on the data)",
                    "skip that layer (skip: [...]), or set energy or rank_ratio instead of macs",
                )
            record.update(macs_before=before, macs_after=after, energy=energy)
        self.record = record
        logger.info(
            "lowrank: %d layers factorised by SVD, %d by Tucker-2", len(record["ranks"]), len(record["tucker2"])
        )
        return model

    def rebuild(self, model: nn.Module) -> nn.Module:
        modules = dict(model.named_modules())
        svd = [(n, "svd", r) for n, r in self.record.get("ranks", {}).items()]
        tucker = [(n, "tucker2", r) for n, r in self.record.get("tucker2", {}).items()]
        fix = "load the checkpoint with the architecture and library version that wrote it"
        for name, kind, recorded in svd + tucker:
            m = modules.get(name)
            if kind == "tucker2" and not (isinstance(m, nn.Conv2d) and m.groups == 1):
                raise RecipeError(
                    f"lowrank recorded Tucker-2 layer {name!r}, which this architecture does not have as a non-grouped "
                    "Conv2d",
                    fix,
                )
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                raise RecipeError(
                    f"lowrank recorded layer {name!r}, which this architecture does not have as Linear/Conv2d", fix
                )
            ranks = _recorded_ranks(name, kind, recorded)
            _replace(model, name, tucker2_layers(m, *ranks) if kind == "tucker2" else _factorized(m, *ranks))
        return model


def _recorded_ranks(name: str, kind: str, recorded: Any) -> tuple[int, ...]:
    """A record entry as ranks: ``r`` (SVD) or ``{"out": r_out, "in": r_in}`` (Tucker-2), each a positive int."""
    if kind == "svd":
        ranks = (recorded,)
    else:
        ranks = tuple(recorded.get(k) for k in ("out", "in")) if isinstance(recorded, dict) else ()
    if not ranks or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise RecipeError(
            f"lowrank recorded {recorded!r} as the ranks of layer {name!r}: expected "
            + ("a positive integer" if kind == "svd" else '{"out": r_out, "in": r_in} of positive integers'),
            "re-create the checkpoint: its recipe was edited or written by another tool",
        )
    return ranks


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
