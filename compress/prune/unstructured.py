"""``sparsity``: unstructured magnitude pruning, the smallest weights held at exactly zero on a cubic schedule.

The weights of the chosen convolutions and linear layers with the smallest magnitude are set to zero, ranked across
all chosen layers together (``scope: global``) or layer by layer (``scope: layer``). During training the share of
zeros grows from ``initial_sparsity`` to ``sparsity`` along the cubic schedule of Zhu & Gupta (2017, "To prune, or
not to prune"): fast at first, while the network has redundant weights to lose, and slowly towards the end::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3        for t0 <= t <= t1

with the masks recomputed every ``every`` optimizer updates, and the final sparsity held from ``t1`` on.

Each chosen weight carries a :class:`WeightMask` through ``torch.nn.utils.parametrize``: the layer computes with
``weight`` where the mask is False set to zero, and the gradient of a pruned entry is zero. The weights themselves are
never edited in place: under DeepSpeed ZeRO-1/2 the optimizer steps its own fp32 master copy and copies it back into
the module after every update, which would undo any in-place zeroing. The masks are buffers, so in-loop states carry
them and DDP broadcasts them like any buffer. A mask is recomputed from the masked weights (module state alone) and
the step, with ties broken by the previous mask and then by position, so every rank (holding the same weights after
each update) computes the same mask, a second call for the same step changes nothing, and a pruned weight never
comes back.

:meth:`UnstructuredSparsity.convert` folds the masks into plain ``weight`` parameters holding exact zeros. They
are new Parameters, not the originals refilled: under ZeRO-1/2 the engine saves DeepSpeed's fp32 master of every
parameter DeepSpeed knows, and the originals' masters never held the zeros. The saved checkpoint is the unpruned
architecture, which loads and exports as usual. What sparsity buys is a smaller *compressed* file (runs of zeros
compress well); dense kernels still multiply the zeros, so a dense runtime's latency and the MAC count do not change.
The record holds the sparsity reached per layer and overall; rebuilding needs no structural change.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimforge.compress.api import CompressionContext, Method, MethodConfig, RecipeError, register_method
from slimforge.compress.prune.structured import _classifier, _stem
from slimforge.compress.quantize.fakequant import quantizers

logger = logging.getLogger(__name__)


@dataclass
class SparsityConfig(MethodConfig):
    """How many weights become zero, where, and on which schedule."""

    sparsity: float = 0.8
    """Target share of the chosen layers' weights that are zero at the end (0.8: four in five)."""
    scope: Literal["global", "layer"] = "global"
    """``global``: rank |w| across all chosen layers together (layers end up with different sparsities, the
    redundant ones pruned more); ``layer``: every chosen layer reaches ``sparsity`` on its own."""
    layers: list[str] = field(default_factory=lambda: ["*"])
    """fnmatch patterns of the module names to prune (their ``Conv2d`` and ``Linear`` weights; biases stay dense)."""
    skip: list[str] = field(default_factory=list)
    """fnmatch patterns of module names kept dense, besides the stem and the classifier."""
    keep_stem: bool = True
    """Keep the first convolution dense: it sees the raw image and has few weights to save."""
    keep_classifier: bool = True
    """Keep the classifier dense: every one of its weights speaks for a class."""
    initial_sparsity: float = 0.0
    """Sparsity at ``start_step``, where the schedule begins (s_i)."""
    start_step: int = 0
    """Optimizer update at which pruning begins (t0); the model stays dense before it."""
    end_step: int | None = None
    """Update at which ``sparsity`` is reached (t1); null: the run's last update. Outside training (one-shot
    compression) with null, ``sparsity`` is applied at once."""
    every: int = 100
    """Recompute the masks every this many updates between ``start_step`` and ``end_step`` (and at ``end_step``)."""

    def validate(self) -> list[str]:
        p = []
        if not 0 < self.sparsity < 1:
            p.append(
                f"sparsity: {self.sparsity} must be in (0, 1), the share of the chosen weights set to zero; set e.g. "
                "sparsity: 0.8 (four in five weights zero)"
            )
        if not 0 <= self.initial_sparsity < 1 or (0 < self.sparsity < 1 and self.initial_sparsity > self.sparsity):
            p.append(f"initial_sparsity: {self.initial_sparsity} must be in [0, sparsity]; 0 starts dense")
        if self.start_step < 0:
            p.append(f"start_step: {self.start_step} must be >= 0")
        if self.end_step is not None and self.end_step <= self.start_step:
            p.append(f"end_step: {self.end_step} must be after start_step ({self.start_step}), or null (the run's end)")
        if self.every < 1:
            p.append(f"every: {self.every} must be >= 1 (updates between mask updates)")
        return p


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """The sparsity of Zhu & Gupta's schedule at update ``step``: 0 before ``start``, ``final`` from ``end`` on.

    Example:
        >>> round(cubic_sparsity(50, 0.0, 0.8, 0, 100), 6)  # half way: 0.8 * (1 - 0.5 ** 3)
        0.7
    """
    if step < start:
        return 0.0
    if step >= end:
        return final
    return final + (initial - final) * (1 - (step - start) / (end - start)) ** 3


class WeightMask(nn.Module):
    """Parametrization ``weight [out, in, ...] -> weight`` with the pruned entries set to zero.

    Args:
        mask: Bool, the weight's shape, True where the weight is kept. Held as a buffer: saved, loaded, moved and
            broadcast with the module's state.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # masked_fill rather than weight * mask: +0.0 where pruned (not -0.0 for negative weights, nor NaN for an
        # infinite one), which is what the folded checkpoint stores and compresses.
        return weight.masked_fill(~self.mask, 0)


def _carries(m: nn.Module, mask: WeightMask) -> bool:
    """Whether ``m``'s weight is still parametrized by ``mask`` (not folded yet)."""
    return parametrize.is_parametrized(m, "weight") and any(p is mask for p in m.parametrizations.weight)


@torch.no_grad()
def keep_largest(scores: torch.Tensor, kept: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` entries of largest score, as a bool mask of the shape of the flat ``scores`` ``[N]``.

    Ties at the threshold go first to the entries ``kept`` (bool ``[N]``) holds, then to the lower position, so the
    choice is the same on every rank and a second call with the same weights returns the same mask.
    """
    n = scores.numel()
    if keep >= n:
        return torch.ones_like(kept)
    if keep <= 0:
        return torch.zeros_like(kept)
    threshold = scores.kthvalue(n - keep + 1).values  # the keep-th largest; a value, the same wherever computed
    chosen = scores > threshold
    ties = (scores == threshold).nonzero().squeeze(1)  # ascending positions
    ties = ties[torch.argsort(~kept[ties], stable=True)]  # previously kept first, positions in order within
    chosen[ties[: keep - int(chosen.sum())]] = True  # .sum() is a sync point: once per mask update
    return chosen


def _pruned_count(sparsity: float, n: int) -> int:
    """How many of ``n`` weights are zero at ``sparsity``: the nearest count (half up), within one weight."""
    return min(n, math.floor(sparsity * n + 0.5))


@register_method("sparsity", SparsityConfig)
class UnstructuredSparsity(Method):
    """Holds the smallest weights of the chosen layers at zero, more of them as training proceeds."""

    config: SparsityConfig

    def __init__(self, config: SparsityConfig, record: dict | None = None) -> None:
        super().__init__(config, record)
        self._end: int | None = None  # t1, known in prepare; None: no schedule (the final sparsity was applied)
        # The masked layers under the names they had in prepare: a later step (qat) may wrap them in new modules,
        # and the record must name them as this step saw them, since rebuild replays the steps in order.
        self._layers: list[tuple[str, nn.Module, WeightMask]] = []

    def chosen(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The ``(name, module)`` pairs whose weights this step prunes, in module order."""
        cfg = self.config
        dense: list[nn.Module] = []
        if cfg.keep_classifier and (head := _classifier(model)) is not None:
            dense.append(head)
        if cfg.keep_stem and (stem := _stem(model)) is not None:
            dense.append(stem)
        return [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
            and not any(m is d for d in dense)
            and any(fnmatch.fnmatchcase(name, p) for p in cfg.layers)
            and not any(fnmatch.fnmatchcase(name, p) for p in cfg.skip)
        ]

    def check_model(self, model: nn.Module) -> None:
        if not self.chosen(model):
            cfg = self.config
            raise RecipeError(
                f"sparsity found no Conv2d or Linear layer to prune (layers: {cfg.layers}, skip: {cfg.skip}, stem "
                f"kept: {cfg.keep_stem}, classifier kept: {cfg.keep_classifier})",
                "widen layers, shorten skip, or set keep_stem / keep_classifier: false",
            )

    def check_topology(
        self, distributed_type: str, zero_stage: int | None, weight_dtype: str = "float32"
    ) -> str | None:
        if "FSDP" in distributed_type or zero_stage == 3:
            return (
                "sparsity ranks every chosen weight tensor whole to choose its mask, and ZeRO-3 / FSDP shard the "
                "weights across ranks (each rank would hold only a slice to rank)"
            )
        if weight_dtype != "float32":
            return (
                f"DeepSpeed's mixed precision holds the module's weights in {weight_dtype}: the folded sparse weights "
                "would be saved from those copies instead of DeepSpeed's fp32 masters (use train.mixed_precision=bf16 "
                "or no)"
            )
        return None

    def prepare(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        cfg = self.config
        self.check_model(model)
        if quantizers(model):
            raise RecipeError(
                "sparsity cannot follow quantisation: qat and ptq fold batch norm into the weights in place, which a "
                "masked weight cannot take",
                "list sparsity before qat/ptq in the recipe",
            )
        self._layers = []
        for name, m in self.chosen(model):
            mask = WeightMask(torch.ones_like(m.weight, dtype=torch.bool))
            parametrize.register_parametrization(m, "weight", mask)
            self._layers.append((name, m, mask))
        end = cfg.end_step if cfg.end_step is not None else ctx.total_steps
        if end is None:
            # Outside training: the target at once, folded at once, since no training follows and a later step (ptq
            # folds batch norm in its prepare) must find plain weights.
            self._end = None
            self._update(model, cfg.sparsity)
            self._fold(model)
            return model
        if ctx.total_steps is not None and end > ctx.total_steps:
            raise RecipeError(
                f"sparsity end_step {end} is after the run's last update ({ctx.total_steps}): the target would "
                "never be reached",
                f"set end_step <= {ctx.total_steps}, or null (the run's last update)",
            )
        if end <= cfg.start_step:
            raise RecipeError(
                f"sparsity start_step {cfg.start_step} is not before the run's last update ({end}): nothing would "
                "be pruned",
                f"set start_step < {end}",
            )
        self._end = end
        self.on_step(model, 0)
        return model

    def sparsity_at(self, step: int) -> float:
        """The schedule's sparsity at update ``step`` (after :meth:`prepare`)."""
        cfg = self.config
        end = cfg.start_step if self._end is None else self._end
        return cubic_sparsity(step, cfg.initial_sparsity, cfg.sparsity, cfg.start_step, end)

    def is_update(self, step: int) -> bool:
        """Whether the masks are recomputed after update ``step``: every ``every`` updates from ``start_step``, and
        at the schedule's end."""
        start = self.config.start_step
        return (
            self._end is not None
            and start <= step <= self._end
            and ((step - start) % self.config.every == 0 or step == self._end)
        )

    def on_step(self, model: nn.Module, step: int) -> None:
        if self.is_update(step):
            self._update(model, self.sparsity_at(step))

    @torch.no_grad()
    def _update(self, model: nn.Module, sparsity: float) -> None:
        """Recomputes every mask to ``sparsity`` from the masked weights (a pruned weight scores 0, so it stays
        pruned as long as the sparsity does not fall)."""
        layers = self._masked(model)
        # |w| in float32: the same ranking whether the module holds fp32, fp16 or bf16 weights.
        scores = [m.weight.detach().abs().float().flatten() for _, m, _ in layers]
        kept = [p.mask.flatten() for _, _, p in layers]
        if self.config.scope == "global":
            flat = torch.cat(scores)
            masks = keep_largest(flat, torch.cat(kept), flat.numel() - _pruned_count(sparsity, flat.numel()))
            masks = masks.split([s.numel() for s in scores])
        else:
            masks = [keep_largest(s, k, s.numel() - _pruned_count(sparsity, s.numel())) for s, k in zip(scores, kept)]
        for (_, _, p), new in zip(layers, masks):
            p.mask.copy_(new.view_as(p.mask))  # in place: DDP and DeepSpeed hold references to the buffer
        logger.info("sparsity: masks of %d layers updated to %.4f", len(layers), sparsity)

    def _masked(self, model: nn.Module) -> list[tuple[str, nn.Module, WeightMask]]:
        """The layers :meth:`prepare` masked that still carry their mask, checked to be part of ``model``."""
        if not self._layers:
            raise RecipeError("sparsity has no masked layers", "call prepare before on_step and convert")
        masked = [(name, m, mask) for name, m, mask in self._layers if _carries(m, mask)]
        present = {id(m) for m in model.modules()}
        if any(id(m) not in present for _, m, _ in masked):
            raise RecipeError(
                "sparsity's masked layers are no longer part of the model: a later step replaced them, or this is "
                "a copy of the model it prepared",
                "list sparsity after the steps that replace layers (prune, lowrank), and pass the model prepare "
                "returned (unwrapped)",
            )
        return masked

    def convert(self, model: nn.Module) -> None:
        """Folds the masks into plain ``weight`` parameters holding exact zeros and records the sparsity reached."""
        if self._end is not None:
            logger.info("sparsity: folded at the schedule's sparsity %.4f", self.sparsity_at(self._end))
        self._fold(model)

    def _fold(self, model: nn.Module) -> None:
        """Removes the masks, leaving their masked values as the plain weights, and records the sparsity reached."""
        masked = self._masked(model)
        if not masked and self.record:
            return  # folded already (one-shot: in prepare), and recorded then, before later steps changed weights
        for _, m, _ in masked:
            with torch.no_grad():
                folded = m.weight.detach().clone()  # through the mask: exact zeros where pruned
            requires_grad = m.parametrizations.weight.original.requires_grad
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            # A new Parameter, not the original one refilled: under ZeRO-1/2 the original has an fp32 master copy in
            # DeepSpeed, which the engine saves in its place and which never held the zeros. Training is over here.
            m.weight = nn.Parameter(folded, requires_grad=requires_grad)
        with torch.no_grad():
            zeros = {name: int((m.weight == 0).sum()) for name, m, _ in self._layers}  # sync points, once
        total = sum(m.weight.numel() for _, m, _ in self._layers)
        self.record = {
            "sparsity": {name: zeros[name] / m.weight.numel() for name, m, _ in self._layers},
            "overall": sum(zeros.values()) / total,
            "end_step": self._end,
        }
        logger.info(
            "sparsity: %.1f%% of %d weights in %d layers are zero", 100 * self.record["overall"], total, len(zeros)
        )

    def rebuild(self, model: nn.Module) -> nn.Module:
        # The folded checkpoint is the plain architecture: only check that it is the one the record describes.
        modules = dict(model.named_modules())
        for name in self.record.get("sparsity", {}):
            if not isinstance(modules.get(name), (nn.Conv2d, nn.Linear)):
                raise RecipeError(
                    f"sparsity recorded layer {name!r}, which this architecture does not have as Conv2d/Linear",
                    "load the checkpoint with the architecture and library version that wrote it",
                )
        return model
