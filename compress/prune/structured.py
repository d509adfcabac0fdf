"""``prune``: structured channel pruning that removes channels, planned on Torch-Pruning's dependency graph.

Removing an output channel of one convolution means removing the matching input channel of every layer that reads
it, the matching batch-norm entries, and, across a residual add, concatenation or grouped / depthwise convolution,
the same channel everywhere that channel is coupled. Torch-Pruning traces the model once into a dependency graph and
prunes whole coupled groups at a time; its importance criteria rank the groups. The network that comes out is a
smaller dense network: fewer MACs, fewer parameters, and a real speed-up on every runtime.

The target is a share of the model's MACs (``macs``), reached step by step: each step removes a small share of the
channels (ranked globally, or layer by layer) and the MACs are counted again, until the target is met. The first
convolution (the stem) and the classifier are kept whole by default; ``skip`` keeps more layers whole.

What is recorded is the channel attributes of every layer that changed and the shape of every parameter and buffer
that changed (:func:`structure_change`), so a fresh process rebuilds the pruned architecture from the unpruned one
without data, without Torch-Pruning and without unpickling modules (:func:`apply_structure`), then the checkpoint's
weights load into it. ``prepare``
checks that such a rebuild reproduces the pruned network's outputs before it returns.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.compress.api import CompressionContext, Method, MethodConfig, RecipeError, register_method
from slimforge.compress.stats import count_macs

logger = logging.getLogger(__name__)


@dataclass
class PruneConfig(MethodConfig):
    """How far to prune, which channels go first, and what stays whole."""

    macs: float = 0.5
    """Share of the model's multiply-accumulates to keep (0.5: half of them), at the example input's size."""
    importance: Literal["l2", "l1", "bn_scale", "taylor"] = "l2"
    """How channel groups are ranked: the L2 or L1 norm of their weights, the magnitude of their batch-norm scale
    (Liu et al., 2017, "Network Slimming"), or ``taylor``: |weight × gradient| of the distillation loss against the
    teacher on ``calibration_images`` real training images (Molchanov et al., 2019); needs a teacher."""
    global_ranking: bool = False
    """Rank channel groups across all layers (layers shrink by different amounts) instead of removing the same
    share from every layer."""
    max_layer_ratio: float = 0.9
    """At most this share of any layer's channels is removed."""
    round_to: int | None = None
    """Keep every layer's channel count a multiple of this (8 is what kernels prefer: ResNet-50 at 224 pruned to half
    its MACs ran 1.89x faster in ONNX Runtime on the CPU with multiples of 8, 1.40x with any count; docs/pruning.md);
    null: any count. Rounded counts move in coarse steps; on a small network no step may land within 3% of
    ``macs`` (the step is then refused, naming the two counts it fell between)."""
    keep_stem: bool = True
    """Keep the first convolution whole (it sees the raw image)."""
    layers: list[str] = field(default_factory=lambda: ["*"])
    """fnmatch patterns of the layers whose output channels may be removed (convolutions and linear layers); the
    others are kept whole. A pattern that names a layer the dependency graph cannot prune is refused, by name."""
    skip: list[str] = field(default_factory=list)
    """fnmatch patterns of layer names kept whole, besides the classifier (always kept) and the stem."""
    steps: int = 100
    """Pruning steps towards the target: each removes about ``max_layer_ratio / steps`` of the channels, so the MACs
    land within one step of the target."""
    calibration_images: int = 64
    """``taylor``: images whose distillation-loss gradient ranks the channels."""

    def validate(self) -> list[str]:
        p = []
        if not 0 < self.macs < 1:
            p.append(f"macs: {self.macs} must be in (0, 1), the share of MACs kept")
        if not 0 < self.max_layer_ratio < 1:
            p.append(f"max_layer_ratio: {self.max_layer_ratio} must be in (0, 1)")
        if self.round_to is not None and self.round_to < 1:
            p.append(f"round_to: {self.round_to} must be >= 1 or null")
        if self.steps < 1:
            p.append(f"steps: {self.steps} must be >= 1")
        if self.calibration_images < 1:
            p.append(f"calibration_images: {self.calibration_images} must be >= 1")
        return p


def structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What channel pruning can change: each convolution's, linear's and norm's channel attributes (``modules``)
    and the shape of every parameter and buffer (``tensors``), by name."""
    modules: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            modules[name] = {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            modules[name] = {"in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            modules[name] = {"num_features": m.num_features}
        elif isinstance(m, nn.GroupNorm):
            modules[name] = {"num_channels": m.num_channels, "num_groups": m.num_groups}
        elif isinstance(m, nn.LayerNorm):
            modules[name] = {"normalized_shape": list(m.normalized_shape)}
    tensors = {n: list(t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    return {"modules": modules, "tensors": tensors}


def structure_change(before: dict, after: dict) -> dict[str, dict[str, Any]]:
    """The entries of ``after`` that differ from ``before``: what a pruning step records."""
    return {k: {n: v for n, v in after[k].items() if before[k].get(n) != v} for k in ("modules", "tensors")}


def apply_structure(model: nn.Module, change: dict[str, dict[str, Any]]) -> nn.Module:
    """Gives every recorded layer its channel attributes and every recorded parameter or buffer its shape, in
    place, uninitialised (a checkpoint's weights load next).

    Raises:
        RecipeError: a recorded layer or tensor does not exist in ``model``.
    """
    modules = dict(model.named_modules())
    fix = "load the checkpoint with the architecture and library versions that wrote it"
    for name, attrs in change.get("modules", {}).items():
        m = modules.get(name)
        if m is None or not all(hasattr(m, a) for a in attrs):
            raise RecipeError(f"prune recorded layer {name!r} ({attrs}), which this architecture does not have", fix)
        for attr, value in attrs.items():
            setattr(m, attr, tuple(value) if isinstance(value, list) else value)
    for name, shape in change.get("tensors", {}).items():
        owner_name, _, leaf = name.rpartition(".")
        owner = modules.get(owner_name)
        old = getattr(owner, leaf, None) if owner is not None else None
        if not isinstance(old, torch.Tensor):
            raise RecipeError(f"prune recorded tensor {name!r}, which this architecture does not have", fix)
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(new, old.requires_grad))
        else:
            owner.register_buffer(leaf, new, persistent=leaf not in owner._non_persistent_buffers_set)
    return model


_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


def _stem(model: nn.Module) -> nn.Module | None:
    """The first convolution (it sees the raw image), or None."""
    return next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)


def _classifier(model: nn.Module) -> nn.Module | None:
    head = getattr(model, "get_classifier", None)
    if callable(head) and isinstance(head(), nn.Module):
        return head()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


@register_method("prune", PruneConfig)
class StructuredPrune(Method):
    """Removes whole channels until the model keeps ``macs`` of its multiply-accumulates."""

    config: PruneConfig

    def check_model(self, model: nn.Module) -> None:
        if not any(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in model.modules()):
            raise RecipeError("prune removes channels of convolutions and linear layers, and this model has none")
        # Removing attention heads needs each attention module's head count and head size changed with its
        # projections, which the recorded channel attributes do not cover: refused rather than rebuilt wrongly.
        attention = [
            n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) or hasattr(m, "num_heads")
        ]
        if attention:
            raise RecipeError(
                f"prune removes channels of convolutional networks; this model has attention layers ({attention[0]!r}"
                f"{f' and {len(attention) - 1} more' if len(attention) > 1 else ''}), whose heads it does not prune",
                "compress a transformer with lowrank or sparsity, or distil it into a CNN student and prune that",
            )

    def _ignored(self, model: nn.Module) -> list[nn.Module]:
        """The layers kept whole: the classifier, the stem (``keep_stem``), ``skip``, and every prunable layer no
        ``layers`` pattern names.

        Raises:
            RecipeError: a ``layers`` or ``skip`` pattern names no layer of the model (close names suggested).
        """
        cfg = self.config
        names = [n for n, _ in model.named_modules() if n]
        for key in ("layers", "skip"):
            for pattern in getattr(cfg, key):
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
                    raise RecipeError(
                        f"prune {key}: {pattern!r} names no layer of this model"
                        + (f" (close: {', '.join(close)})" if close else ""),
                        f"use the module names of model.named_modules(), e.g. {', '.join(close or names[:3])}",
                    )
        ignored = [m for m in (_classifier(model), _stem(model) if cfg.keep_stem else None) if m is not None]
        for n, m in model.named_modules():
            if not n:
                continue
            if any(fnmatch.fnmatchcase(n, p) for p in cfg.skip):
                ignored.append(m)
            elif isinstance(m, _PRUNABLE) and not any(fnmatch.fnmatchcase(n, p) for p in cfg.layers):
                ignored.append(m)
        return ignored

    def _check_requested(self, model: nn.Module, graph, ignored: list[nn.Module]) -> None:
        """Refuses a layer named in ``layers`` (not by the catch-all ``*``) whose output channels the dependency
        graph cannot remove: it is kept whole, or coupled with a layer that is, or of a kind without a pruner."""
        requested = [p for p in self.config.layers if p != "*"]
        if not requested:
            return
        prunable = set()
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=_PRUNABLE):
            prunable.update(id(dep.target.module) for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler))
        for name, m in model.named_modules():
            if name and any(fnmatch.fnmatchcase(name, p) for p in requested) and isinstance(m, _PRUNABLE):
                if id(m) not in prunable or m in ignored:
                    why = "the classifier or the stem" if m in ignored else "coupled with a layer kept whole"
                    raise RecipeError(
                        f"prune cannot remove output channels of layer {name!r} ({type(m).__name__}): the dependency "
                        f"graph keeps it whole ({why})",
                        "remove it from layers (the classifier's outputs are the classes; keep_stem: false frees the "
                        "stem), or un-skip the layers it is coupled with",
                    )

    def _importance(self, ctx: CompressionContext):
        import torch_pruning as tp

        imp = self.config.importance
        if imp == "taylor":
            if ctx.teacher is None:
                raise RecipeError(
                    "prune importance 'taylor' ranks channels by the distillation loss's gradient, and this run has "
                    "no teacher",
                    "prune under train/distill.py, or choose importance l2, l1 or bn_scale",
                )
            if ctx.batches is None:
                raise RecipeError(
                    "prune importance 'taylor' needs training images, and none were given",
                    "prune where the run's data is available, or choose importance l2, l1 or bn_scale",
                )
            return tp.importance.GroupTaylorImportance()
        if imp == "bn_scale":
            return tp.importance.BNScaleImportance()
        return tp.importance.GroupMagnitudeImportance(p=1 if imp == "l1" else 2)

    def _kd_gradients(self, model: nn.Module, ctx: CompressionContext, images: list[torch.Tensor]) -> None:
        """Accumulates the gradient of the KL divergence to the teacher over ``images`` (train-mode statistics
        untouched: batch norm in eval mode)."""
        was_training = model.training
        model.eval()
        model.zero_grad(set_to_none=True)
        for x in images:
            with torch.no_grad():
                target = F.softmax(ctx.teacher(x), dim=-1)
            F.kl_div(F.log_softmax(model(x), dim=-1), target, reduction="batchmean").backward()
        model.train(was_training)

    def _prune_until(self, model, ctx, example, importance, images, target, max_steps=None):
        """Prunes ``model`` in place step by step until its MACs are at most ``target`` (or ``max_steps`` steps).

        Returns:
            ``(model, steps taken, MACs before the last step, MACs after it)``.
        """
        import torch_pruning as tp

        cfg = self.config
        ignored = self._ignored(model)
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=importance,
            global_pruning=cfg.global_ranking,
            pruning_ratio=cfg.max_layer_ratio,
            max_pruning_ratio=cfg.max_layer_ratio,
            iterative_steps=cfg.steps,
            ignored_layers=ignored,
            round_to=cfg.round_to,
        )
        self._check_requested(model, pruner.DG, ignored)
        after = previous = count_macs(model, example.shape[1:])
        taken = 0
        for _ in range(cfg.steps if max_steps is None else max_steps):
            if images:
                self._kd_gradients(model, ctx, images)
            pruner.step()
            taken += 1
            previous, after = after, count_macs(model, example.shape[1:])
            if after <= target:
                break
        model.zero_grad(set_to_none=True)
        return model, taken, previous, after

    def prepare(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        cfg = self.config
        device = next(model.parameters()).device  # the bare model, where the engine built it (before any wrapper)
        example = ctx.example_input.to(device)
        original = copy.deepcopy(model)
        before = count_macs(model, example.shape[1:])
        importance = self._importance(ctx)
        images = []
        if cfg.importance == "taylor":
            images = [b.to(device) for b in ctx.batches(cfg.calibration_images)]
        target = cfg.macs * before
        model, taken, previous, after = self._prune_until(model, ctx, example, importance, images, target)
        if after < target * 0.97 and previous <= target * 1.03 and taken > 1:
            # The last step jumped past the target (rounded counts move in coarse steps) but the one before was
            # within 3% of it: redo the same deterministic steps on the unpruned copy and stop one earlier.
            logger.info("prune: step %d went from %.1f%% to %.1f%% of the MACs; keeping step %d (%.1f%%)", taken,
                        100 * previous / before, 100 * after / before, taken - 1, 100 * previous / before)  # fmt: skip
            model, _, _, after = self._prune_until(copy.deepcopy(original), ctx, example, importance, images, target,
                                                   max_steps=taken - 1)  # fmt: skip
        if after > target * 1.03:
            raise RecipeError(
                f"prune reached {after / before:.1%} of the MACs, not the {cfg.macs:.0%} asked for: the layers it may "
                f"prune are at max_layer_ratio {cfg.max_layer_ratio} or kept whole",
                "raise max_layer_ratio, set global_ranking: true, skip fewer layers, or ask for a larger macs",
            )
        if after < target * 0.97:
            rounding = f" (channel counts rounded to multiples of {cfg.round_to} move together)" if cfg.round_to else ""
            raise RecipeError(
                f"prune's last step went from {previous / before:.1%} to {after / before:.1%} of the MACs, past the "
                f"{cfg.macs:.0%} asked for (±3%){rounding}",
                ("" if cfg.global_ranking else "set global_ranking: true (finer steps), ")
                + "raise steps, ask for a macs on either side of that step, or set round_to: null",
            )
        change = structure_change(structure(original), structure(model))
        self._check_rebuild(original, model, change, example)
        self.record = {"structure": change, "macs_before": before, "macs_after": after}
        logger.info(
            "prune: %.1f%% of the MACs kept (%d -> %d), %d layers changed", 100 * after / before, before, after,
            len(change["modules"]),
        )  # fmt: skip
        return model

    @staticmethod
    @torch.no_grad()
    def _check_rebuild(original: nn.Module, pruned: nn.Module, change: dict, example: torch.Tensor) -> None:
        """A model rebuilt from the recorded structure alone must compute what the pruned one does."""
        rebuilt = apply_structure(original, change)
        try:
            rebuilt.load_state_dict(pruned.state_dict())
        except RuntimeError as e:
            raise RecipeError(
                f"the pruned network cannot be rebuilt from its recorded channel counts ({str(e).splitlines()[0]})",
                "skip the layers whose channels another kind of module couples (skip: [...]) and prune again",
            ) from None
        was = pruned.training
        pruned.eval()
        rebuilt.eval()
        same = torch.allclose(rebuilt(example), pruned(example), rtol=1e-4, atol=1e-5)
        pruned.train(was)
        if not same:
            raise RecipeError(
                "the network rebuilt from the recorded channel counts computes something else than the pruned one "
                "(a module keeps a channel count outside its weights)",
                "skip the layers around that module (skip: [...]) and prune again",
            )

    def rebuild(self, model: nn.Module) -> nn.Module:
        return apply_structure(model, self.record.get("structure", {}))
