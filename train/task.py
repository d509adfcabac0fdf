"""Training tasks: given the (wrapped) student and a batch, return a dict of losses.

As in timm's ``timm/task/distillation.py``, the teacher lives in the task, not in the model Accelerate wraps: it
is never handed to ``accelerator.prepare``, so it gets no DDP/DeepSpeed wrapper, no gradient all-reduce, no
optimizer state and no place in the student's checkpoint. A task that needs trainable parts of its own (the
projectors of FitNets hints) puts them next to the student in one module, :class:`StudentWithAdapters`, which is
what Accelerate prepares: the adapters are trained, synchronised, sharded, saved in resumable states and resumed
with the student, and stripped when the student is saved (:attr:`StudentWithAdapters.student`).

A task is chosen by its registered name, ``loss.task`` (``kd``, ``dkd``, ``hint``); ``train/train.py`` uses
``supervised``. Every task receives the whole batch: ``pixel_values`` ``[B, C, H, W]``, ``label`` ``[B]``,
``index`` and ``epoch`` ``[B]`` (which sample, which epoch's view: what the cached teacher is keyed by), and with
Mixup/CutMix ``target`` ``[B, N]`` (soft labels).

Example:
    Inside the training loop (``model`` prepared by Accelerate)::

        task = build_task(cfg.loss, teacher=LiveTeacher(teacher))
        losses = task(model, batch)  # {"loss", "kd", "ce", "logits"}
        accelerator.backward(losses["loss"])
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.train.errors import ConfigError
from slimforge.train.features import FeatureTap
from slimforge.train.losses import (
    HintProjector,
    LossConfig,
    dkd_loss,
    hint_loss,
    kd_loss,
    soft_target_cross_entropy,
    standardize_logits,
    topk_kd_loss,
)

logger = logging.getLogger(__name__)

_TASKS: dict[str, type] = {}


def register_task(name: str) -> Callable[[type], type]:
    """Registers a task class under ``name`` (``loss.task`` selects it)."""

    def decorator(cls: type) -> type:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return decorator


def task_names() -> list[str]:
    return sorted(n for n in _TASKS if n != "supervised")


def freeze_(model: nn.Module) -> nn.Module:
    """Puts ``model`` in eval mode (BatchNorm uses running stats, dropout off) and stops its gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def teacher_view(teacher: nn.Module, spec, data_info: dict[str, Any]) -> nn.Module:
    """The teacher behind the conversion from the student's input to the one it was trained on (size, channels,
    normalisation; :mod:`slimforge.train.teacher`), or the teacher itself when they are the same."""
    from slimforge.train.teacher import AdaptedTeacher, teacher_input

    mean, std = spec.mean or list(data_info["mean"]), spec.std or list(data_info["std"])
    view = teacher_input(
        (list(data_info["input_size"]), list(data_info["mean"]), list(data_info["std"])),
        (list(spec.input_size), list(mean), list(std)),
        spec.interpolation,
    )
    return teacher if view is None else AdaptedTeacher(teacher, view)


def inner_teacher(teacher: nn.Module) -> nn.Module:
    """The teacher network itself under its input view (where layer names are the checkpoint's)."""
    from slimforge.train.teacher import AdaptedTeacher

    return teacher.teacher if isinstance(teacher, AdaptedTeacher) else teacher


class LiveTeacher:
    """Teacher outputs from a frozen module run on the batch (replicated or sharded placement)."""

    cached = False

    def __init__(self, module: nn.Module) -> None:
        self.module = freeze_(module)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # no_grad, not inference_mode: the teacher's logits are saved by the KL backward, and inference tensors
        # cannot be saved for backward.
        with torch.no_grad():
            return self.module(batch["pixel_values"])


class CacheTeacher:
    """Teacher outputs looked up by the batch's ``(epoch, index)`` in a :class:`slimforge.train.teacher_cache.
    CachedTeacher`: no teacher forward at all."""

    cached = True
    module = None

    def __init__(self, cache) -> None:
        self.cache = cache
        self.complete = cache.k == cache.num_classes

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.cache.logits(batch["epoch"], batch["index"])

    def topk(self, batch: dict[str, torch.Tensor]):
        return self.cache.lookup(batch["epoch"], batch["index"])


def ce_term(logits: torch.Tensor, batch: dict[str, torch.Tensor], cfg: LossConfig) -> torch.Tensor:
    """Cross-entropy on the labels, or on the soft targets Mixup/CutMix made (label smoothing applied to either)."""
    if "target" in batch:
        target = batch["target"].float()
        if cfg.label_smoothing:
            target = target * (1.0 - cfg.label_smoothing) + cfg.label_smoothing / target.shape[1]
        return soft_target_cross_entropy(logits, target)
    return F.cross_entropy(logits.float(), batch["label"], label_smoothing=cfg.label_smoothing)


def _logits(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@register_task("supervised")
class SupervisedTask:
    """Cross-entropy on the labels (``train/train.py``)."""

    def __init__(self, loss: LossConfig, teacher=None) -> None:
        self.cfg = loss

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns ``{"loss", "ce", "logits"}``."""
        logits = _logits(model(batch["pixel_values"]))
        ce = ce_term(logits, batch, self.cfg)
        return {"loss": ce, "ce": ce, "logits": logits.detach()}


@register_task("kd")
class LogitDistillation:
    """``alpha * KD + (1 - alpha) * CE`` (Hinton et al. 2015; :func:`slimforge.train.losses.kd_loss`), on
    standardised logits with ``loss.standardize``. From a cached teacher holding only its top-k classes, KD is
    :func:`slimforge.train.losses.topk_kd_loss`."""

    def __init__(self, loss: LossConfig, teacher) -> None:
        self.cfg = loss
        self.teacher = teacher
        if teacher.cached and not teacher.complete and loss.standardize:
            raise ConfigError(
                ["loss.standardize: standardising needs all the teacher's logits; the cache holds its top-k"],
                fix="cache every class (cache.topk=null) or set loss.standardize=false",
            )

    def logit_term(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t = self.cfg.temperature
        if self.teacher.cached and not self.teacher.complete:
            values, indices, lse = self.teacher.topk(batch)
            return {"kd": topk_kd_loss(logits, values, indices, t, lse)}
        teacher_logits = self.teacher.logits(batch)
        if self.cfg.standardize:
            return {"kd": kd_loss(standardize_logits(logits), standardize_logits(teacher_logits), t)}
        return {"kd": kd_loss(logits, teacher_logits, t)}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns ``{"loss", "kd" (or "dkd", "tckd", "nckd"), "ce", "logits"}``."""
        out = model(batch["pixel_values"])
        logits = _logits(out)
        terms = self.logit_term(logits, batch)
        ce = ce_term(logits, batch, self.cfg)
        soft = terms.get("dkd", terms.get("kd"))
        total = self.cfg.alpha * soft + (1.0 - self.cfg.alpha) * ce
        total = total + self.extra_terms(out, batch, terms)
        return {"loss": total, **terms, "ce": ce, "logits": logits.detach()}

    def extra_terms(self, out: Any, batch: dict[str, torch.Tensor], terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.zeros((), device=batch["pixel_values"].device)


@register_task("dkd")
class DecoupledDistillation(LogitDistillation):
    """``alpha * DKD + (1 - alpha) * CE`` with DKD = ``dkd_alpha * TCKD + dkd_beta * NCKD`` (Zhao et al., CVPR
    2022; :func:`slimforge.train.losses.dkd_loss`), on standardised logits with ``loss.standardize``. Needs all the
    teacher's logits (a live teacher, or a cache of every class)."""

    def __init__(self, loss: LossConfig, teacher) -> None:
        super().__init__(loss, teacher)
        if teacher.cached and not teacher.complete:
            raise ConfigError(
                ["loss.task: dkd needs the teacher's logit of every class; the cache holds its top-k"],
                fix="cache every class (cache.topk=null), or use loss.task=kd with a top-k cache",
            )

    def logit_term(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        teacher_logits = self.teacher.logits(batch)
        if self.cfg.standardize:
            logits, teacher_logits = standardize_logits(logits), standardize_logits(teacher_logits)
        c = self.cfg
        return dkd_loss(logits, teacher_logits, batch["label"], c.temperature, c.dkd_alpha, c.dkd_beta)


class StudentWithAdapters(nn.Module):
    """The student and a task's trainable adapters, prepared by Accelerate as one module.

    ``forward(images)`` returns ``(logits, {layer: adapted feature})``: the student's logits and, for each tapped
    student layer, its output through its adapter (so the adapters take part in the forward pass DDP and DeepSpeed
    track). Only :attr:`student` is saved as the trained model.
    """

    def __init__(self, student: nn.Module, adapters: nn.ModuleDict, tap: FeatureTap) -> None:
        super().__init__()
        self.student = student
        self.adapters = adapters
        self._tap = tap

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        feats = self._tap.pop()
        return logits, {name: self.adapters[_key(name)](f) for name, f in feats.items()}


def _key(layer: str) -> str:
    return layer.replace(".", "__")  # ModuleDict keys cannot hold dots


@register_task("hint")
class HintDistillation(LogitDistillation):
    """Logit KD plus FitNets hints (Romero et al., ICLR 2015): for each ``loss.hints`` pair, the student layer's
    output through a trainable projector (1×1 conv + BatchNorm for feature maps, linear for vectors) is matched to
    the teacher layer's output by :func:`slimforge.train.losses.hint_loss` (spatial sizes pooled to the smaller),
    weighted by the pair's ``weight``: ``alpha * KD + (1 - alpha) * CE + sum_i weight_i * hint_i``."""

    def __init__(self, loss: LossConfig, teacher) -> None:
        super().__init__(loss, teacher)
        if teacher.cached:
            raise ConfigError(
                ["loss.task: hint matches the teacher's intermediate features, which a cache does not hold"],
                fix="use train.teacher_placement=replicated or sharded with hints, or loss.task=kd with a cache",
            )
        if not loss.hints:
            raise ConfigError(
                ["loss.hints: task hint needs at least one {student: LAYER, teacher: LAYER, weight: W} pair"],
                fix="name the layers, e.g. loss.hints=[{student: layer3, teacher: layer3, weight: 1.0}]",
            )
        self.teacher_tap: FeatureTap | None = None

    def wrap_student(self, student: nn.Module, example: torch.Tensor) -> StudentWithAdapters:
        """Taps the student's and the teacher's hint layers, sizes one adapter per pair from a forward pass of
        ``example`` through both, and returns the student with its adapters (to be prepared by Accelerate)."""
        hints = self.cfg.hints
        student_tap = FeatureTap(student, [h["student"] for h in hints], "student", "loss.hints[].student")
        teacher = inner_teacher(self.teacher.module)
        self.teacher_tap = FeatureTap(teacher, [h["teacher"] for h in hints], "teacher", "loss.hints[].teacher")
        was_training = student.training
        with torch.no_grad():
            student.eval()
            student(example)
            self.teacher.module(example)
        student.train(was_training)
        s_feats, t_feats = student_tap.pop(), self.teacher_tap.pop()
        adapters = nn.ModuleDict()
        for h in hints:
            s, t = s_feats[h["student"]], t_feats[h["teacher"]]
            if s.dim() != t.dim() or s.dim() not in (2, 4):
                raise ConfigError(
                    [f"loss.hints: student layer {h['student']!r} gives {list(s.shape)}, teacher layer "
                     f"{h['teacher']!r} gives {list(t.shape)}: both must be feature maps [B, C, H, W] or vectors "
                     "[B, C]"],
                    fix="pair layers of the same kind (e.g. the last block of a stage in both networks)",
                )  # fmt: skip
            adapters[_key(h["student"])] = HintProjector(s.shape[1], t.shape[1], "conv" if s.dim() == 4 else "linear")
            logger.info("hint %s %s -> teacher %s %s (projector %d -> %d channels)", h["student"], list(s.shape[1:]),
                        h["teacher"], list(t.shape[1:]), s.shape[1], t.shape[1])  # fmt: skip
        return StudentWithAdapters(student, adapters, student_tap)

    def extra_terms(self, out: Any, batch: dict[str, torch.Tensor], terms: dict[str, torch.Tensor]) -> torch.Tensor:
        _, adapted = out
        t_feats = self.teacher_tap.pop()  # the teacher ran in logit_term, on this batch
        total = torch.zeros((), device=batch["pixel_values"].device)
        for h in self.cfg.hints:
            term = hint_loss(adapted[h["student"]], t_feats[h["teacher"]])
            terms[f"hint_{h['student']}"] = term
            total = total + float(h.get("weight", 1.0)) * term
        return total


def build_task(loss: LossConfig, teacher=None, supervised: bool = False):
    """The task ``loss.task`` names (``supervised`` for ``train/train.py``), bound to its teacher source.

    Raises:
        ConfigError: an unknown task, or a task the teacher source cannot serve (hints or DKD from a top-k cache).
    """
    name = "supervised" if supervised else loss.task
    if name not in _TASKS:
        raise ConfigError([f"loss.task: {name!r} is not a task"], fix=f"choose one of {', '.join(task_names())}")
    return _TASKS[name](loss, teacher)
