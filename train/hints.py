"""Hint loss (:func:`hint_loss`, :class:`HintProjector`), after Romero et al. (2015), "FitNets: Hints for Thin Deep
Nets" (ICLR): the mean squared error between an intermediate student feature map, passed through a trainable
projector to the teacher's channel count, and the teacher's feature map at a chosen layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.train.losses import compute_dtype


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al., ICLR 2015): mean squared error between student and teacher features.

    The student feature is expected to be already projected to the teacher's channel count (by a
    :class:`HintProjector`). If the spatial sizes differ, the larger map is average-pooled down to the smaller
    one with ``F.adaptive_avg_pool2d`` (each dimension separately: both maps are brought to
    ``(min(H_s, H_t), min(W_s, W_t))``; non-integer ratios use adaptive pooling's overlapping windows). The
    teacher's feature is treated as a constant.

    Args:
        student_feature: ``[B, C, H_s, W_s]`` or ``[B, C]``.
        teacher_feature: ``[B, C, H_t, W_t]`` or ``[B, C]``, same rank, batch and channel count as the student's.

    Returns:
        Scalar mean over all elements of the squared difference, float32 even under autocast (float64 inputs
        in float64).

    Raises:
        ValueError: ranks, batch sizes or channel counts differ (channels need a projector).
    """
    s_shape, t_shape = tuple(student_feature.shape), tuple(teacher_feature.shape)
    if student_feature.dim() != teacher_feature.dim() or student_feature.dim() not in (2, 4):
        raise ValueError(
            f"hint_loss needs two [B, C, H, W] or two [B, C] features; got student {s_shape} and teacher {t_shape}"
        )
    if s_shape[0] != t_shape[0]:
        raise ValueError(f"hint_loss batch sizes differ: student {s_shape}, teacher {t_shape}")
    if s_shape[1] != t_shape[1]:
        raise ValueError(
            f"hint_loss channel counts differ: student {s_shape}, teacher {t_shape}; project the student feature "
            f"to {t_shape[1]} channels first (a projector such as HintProjector({s_shape[1]}, {t_shape[1]}) is needed)"
        )
    dtype = compute_dtype(student_feature, teacher_feature)
    s = student_feature.to(dtype)
    te = teacher_feature.detach().to(dtype)
    if s.dim() == 4 and s_shape[2:] != t_shape[2:]:
        size = (min(s_shape[2], t_shape[2]), min(s_shape[3], t_shape[3]))
        if s_shape[2:] != size:
            s = F.adaptive_avg_pool2d(s, size)
        if t_shape[2:] != size:
            te = F.adaptive_avg_pool2d(te, size)
    return F.mse_loss(s, te)


class HintProjector(nn.Module):
    """Trainable adapter mapping a student feature to the teacher's channel count for :func:`hint_loss`.

    ``kind="conv"``: a 1x1 ``Conv2d`` without bias followed by ``BatchNorm2d``, for ``[B, C, H, W]`` maps;
    ``kind="linear"``: an ``nn.Linear``, for ``[B, C]`` features. It is trained together with the student (its
    parameters belong in the optimiser) and is a training-time helper only: it is never exported with the
    student.

    Args:
        in_channels: Student channels.
        out_channels: Teacher channels.
        kind: ``"conv"`` or ``"linear"``.
    """

    def __init__(self, in_channels: int, out_channels: int, kind: str = "conv") -> None:
        super().__init__()
        if kind == "conv":
            self.proj: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels)
            )
        elif kind == "linear":
            self.proj = nn.Linear(in_channels, out_channels)
        else:
            raise ValueError(f"HintProjector kind must be 'conv' or 'linear'; got {kind!r}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in, H, W]`` -> ``[B, out, H, W]`` (conv) or ``[B, in]`` -> ``[B, out]`` (linear)."""
        return self.proj(x)
