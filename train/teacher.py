"""The teacher sees what it was trained on: its own input size, channels and normalisation.

A teacher checkpoint records the input it was trained on (``input_size``, ``mean``, ``std``, ``interpolation``).
When the student's data differ, :class:`TeacherInput` turns each student batch into the teacher's view inside the
task, as timm's distillation teacher does: undo the student's normalisation, convert channels (grayscale ↔ RGB),
resize to the teacher's resolution (its interpolation when shrinking, bicubic when enlarging), apply the teacher's
normalisation. The student and the
teacher therefore see the same (augmented) image, each as its own training pipeline would present it.

Example:
    >>> view = TeacherInput(student=([1, 32, 32], [0.13], [0.31]), teacher=([3, 64, 64], [0.485, 0.456, 0.406],
    ...                     [0.229, 0.224, 0.225]), interpolation="bilinear")
    >>> view(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 3, 64, 64])
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# ITU-R BT.601 luma, the weights PIL's convert("L") uses.
_LUMA = (0.299, 0.587, 0.114)

Input = tuple[list[int], list[float], list[float]]
"""``([C, H, W], mean, std)`` of a model's input."""


class TeacherInput(nn.Module):
    """Student-normalised images ``[B, Cs, Hs, Ws]`` → the teacher's input ``[B, Ct, Ht, Wt]``.

    Args:
        student: ``([C, H, W], mean, std)`` of the student's batches.
        teacher: ``([C, H, W], mean, std)`` the teacher was trained on.
        interpolation: The teacher's resize interpolation (``bilinear``, ``bicubic``, ``nearest``).
    """

    def __init__(self, student: Input, teacher: Input, interpolation: str = "bilinear") -> None:
        super().__init__()
        (cs, *_), s_mean, s_std = student
        (ct, ht, wt), t_mean, t_std = teacher
        self.size = (ht, wt)
        self.mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
        self.channels = (cs, ct)
        self.register_buffer("s_mean", torch.tensor(s_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("s_std", torch.tensor(s_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("t_mean", torch.tensor(t_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("t_std", torch.tensor(t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * self.s_std + self.s_mean  # pixel values in [0, 1]
        cs, ct = self.channels
        if cs == 1 and ct == 3:
            x = x.expand(-1, 3, -1, -1)
        elif cs == 3 and ct == 1:
            x = (x * self.luma).sum(1, keepdim=True)
        if tuple(x.shape[-2:]) != self.size:
            upsampling = self.size[0] > x.shape[-2] or self.size[1] > x.shape[-1]
            # Upsampling a batch the student's pipeline has already resampled once: bicubic (then clipped to the
            # pixel range, as an 8-bit image would be) stays closest to resampling the source once. Measured on
            # a 64-px teacher fed 28 → 32 px digits: top-1 agreement with its own 28 → 64 px pipeline 0.99 with
            # bicubic, 0.96 with bilinear (docs/distillation.md). Downsampling uses the teacher's interpolation.
            mode = "bicubic" if upsampling and self.mode != "nearest" else self.mode
            kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
            x = F.interpolate(x, size=self.size, mode=mode, **kwargs)
            if mode == "bicubic":
                x = x.clamp(0.0, 1.0)
        return (x - self.t_mean) / self.t_std

    def extra_repr(self) -> str:
        return f"channels={self.channels}, size={self.size}, mode={self.mode}"


class AdaptedTeacher(nn.Module):
    """``teacher(view(images))``: a frozen teacher behind its :class:`TeacherInput`."""

    def __init__(self, teacher: nn.Module, view: TeacherInput) -> None:
        super().__init__()
        self.view = view
        self.teacher = teacher

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.view(images))


def teacher_input(student: Input, teacher: Input, interpolation: str) -> TeacherInput | None:
    """The adapter from the student's input to the teacher's, or ``None`` when they are the same."""
    same = list(student[0]) == list(teacher[0]) and _close(student[1], teacher[1]) and _close(student[2], teacher[2])
    if same:
        return None
    logger.info(
        "the teacher was trained on %s images (mean %s, std %s), the student's data are %s (mean %s, std %s): the "
        "task converts each batch to the teacher's view (%s resize, its own normalisation)",
        "×".join(map(str, teacher[0])),
        _fmt(teacher[1]),
        _fmt(teacher[2]),
        "×".join(map(str, student[0])),
        _fmt(student[1]),
        _fmt(student[2]),
        interpolation,
    )
    return TeacherInput(student, teacher, interpolation)


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-6 for x, y in zip(a, b))


def _fmt(v: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in v) + "]"
