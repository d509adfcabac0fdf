"""Distillation losses.

Logit distillation after Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network":

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

``alpha`` weights the **distillation** term; ``1 - alpha`` weights the hard-label cross-entropy. The ``T^2``
factor keeps the soft term's gradient magnitude independent of the temperature (§2.1 of the paper): at high
``T`` with zero-mean logits, d(T^2 * KL)/dz_s ≈ (z_s - z_t) / N per sample, N the number of classes.

Logit standardisation (:func:`standardize_logits`), after Sun et al. (2024), "Logit Standardization in Knowledge
Distillation" (CVPR): each sample's logits are replaced by their z-score ``(z - mean(z)) / std(z)`` before the
temperature, for the student and the teacher alike, so the student has to match the teacher's logit *ranking and
spread* rather than its absolute scale and offset. The resulting KD is invariant to adding a constant to, or
scaling by a positive factor, either model's logits.

Decoupled KD (:func:`dkd_loss`), after Zhao et al. (2022), "Decoupled Knowledge Distillation" (CVPR): the KD
term per sample splits exactly into ``TCKD + (1 - p_t^T) * NCKD``, where TCKD is the KL of the binary
target/non-target distributions and NCKD the KL among the non-target classes (renormalised), ``p_t^T`` the
teacher's probability of the true class at temperature T. DKD drops the ``(1 - p_t^T)`` coupling and weights the
two parts freely: ``alpha * TCKD + beta * NCKD`` (both times ``T^2``).

Top-k KD (:func:`topk_kd_loss`): KD against a teacher cached only as its k largest logits per sample. Both
distributions are coarsened to k + 1 buckets (the k stored classes and one "rest" bucket holding everything
else); with the logsumexp of all the teacher's logits stored next to the cache the teacher's rest mass is exact.
At k = N this is exactly :func:`kd_loss`.

Hint loss (:func:`hint_loss`, :class:`HintProjector`), after Romero et al. (2015), "FitNets: Hints for Thin Deep
Nets" (ICLR): the mean squared error between an intermediate student feature map, passed through a trainable
projector to the teacher's channel count, and the teacher's feature map at a chosen layer.

Soft-target cross-entropy (:func:`soft_target_cross_entropy`): cross-entropy against the probability vectors
Mixup (Zhang et al., 2018, "mixup: Beyond Empirical Risk Minimization", ICLR) and CutMix (Yun et al., 2019,
"CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features", ICCV) make of the labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LossConfig:
    """Loss terms of supervised and distillation training."""

    temperature: float = 4.0
    """Softmax temperature T of the distillation term (distill.py only)."""
    alpha: float = 0.9
    """Weight of the distillation term; the hard-label cross-entropy gets 1 - alpha (distill.py only)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy term."""
    task: Literal["kd", "dkd", "hint"] = "kd"
    """distill.py's task (``slimforge.train.task``): ``kd`` logit KD, ``dkd`` decoupled KD, ``hint`` logit KD plus
    FitNets hints on ``hints``. Each is combined with the cross-entropy as ``alpha`` says."""
    standardize: bool = False
    """Standardise both models' logits per sample (zero mean, unit std) before the KD/DKD term (Sun et al., CVPR
    2024); the temperature then acts on standardised logits."""
    dkd_alpha: float = 1.0
    """Task dkd: weight of the target-class term (TCKD)."""
    dkd_beta: float = 8.0
    """Task dkd: weight of the non-target term (NCKD); the paper uses 8 on CIFAR-100, 0.5 on ImageNet."""
    hints: list[dict[str, Any]] = field(default_factory=list)
    """Task hint: ``[{student: LAYER, teacher: LAYER, weight: W}]``, layer names as ``named_modules()`` gives them
    (e.g. ``layer3``); each pair gets a trainable projector, saved in resumable states, never in the checkpoint."""

    def validate(self) -> list[str]:
        p = []
        for i, h in enumerate(self.hints):
            keys = set(h) if isinstance(h, dict) else set()
            if not {"student", "teacher"} <= keys or keys - {"student", "teacher", "weight"}:
                p.append(f"hints[{i}]: {h!r} must be {{student: LAYER, teacher: LAYER, weight: W}} (weight optional)")
            elif not isinstance(h.get("weight", 1.0), (int, float)) or h.get("weight", 1.0) < 0:
                p.append(f"hints[{i}].weight: {h.get('weight')!r} must be a number >= 0")
        if self.hints and self.task != "hint":
            p.append(f"hints: only task hint uses them (loss.task is {self.task!r}): set loss.task=hint or remove them")
        if self.dkd_alpha < 0 or self.dkd_beta < 0:
            p.append(f"dkd_alpha, dkd_beta: {self.dkd_alpha}, {self.dkd_beta} must be >= 0")
        if self.temperature <= 0:
            p.append(f"temperature: {self.temperature} must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            p.append(f"alpha: {self.alpha} must be in [0, 1] (it weights the distillation term)")
        if not 0.0 <= self.label_smoothing < 1.0:
            p.append(f"label_smoothing: {self.label_smoothing} must be in [0, 1)")
        return p


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Float32 or better: fp16/bf16 (e.g. under autocast) and float32 give float32, float64 stays float64.

    Softmax/KL in reduced precision lose the small differences KD is made of. Autocast leaves float64 alone, so
    an explicit float64 computation stays float64 under it.
    """
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Elementwise ``p * (log p - log q)`` with ``p = exp(log_p)``, exactly 0 where ``p == 0``.

    Where ``p`` is 0 (``log_p`` = -inf, or ``exp`` underflowed) the term is 0 even if ``log_q`` is -inf too, and
    neither the value nor the gradient carries a NaN: both logs are replaced by 0 there before subtracting.
    """
    p = log_p.exp()
    keep = p > 0
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    diff = torch.where(keep, log_p, zero) - torch.where(keep, log_q, zero)
    return torch.where(keep, p * diff, zero)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled KL divergence of the student from the teacher, times ``T^2``, averaged over the batch.

    Args:
        student_logits: ``[B, N]`` raw student scores.
        teacher_logits: ``[B, N]`` raw teacher scores (treated as constants).
        temperature: Softmax temperature T.

    Returns:
        Scalar ``T^2 * mean_b KL(p_t^T || p_s^T)``, computed in float32 even under autocast (float64 inputs in
        float64).

    Example:
        >>> z = torch.randn(4, 10)
        >>> float(kd_loss(z, z, 4.0)) < 1e-6
        True
    """
    t = temperature
    dtype = _compute_dtype(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits.to(dtype) / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().to(dtype) / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, cfg: LossConfig
) -> dict[str, torch.Tensor]:
    """``alpha * kd + (1 - alpha) * ce`` with its parts, for logging.

    Args:
        student_logits: ``[B, N]``.
        teacher_logits: ``[B, N]``.
        labels: ``[B]`` class indices.
        cfg: Temperature, alpha, label smoothing.

    Returns:
        ``{"loss": total, "kd": soft term, "ce": hard term}`` scalars.
    """
    kd = kd_loss(student_logits, teacher_logits, cfg.temperature)
    ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=cfg.label_smoothing)
    return {"loss": cfg.alpha * kd + (1.0 - cfg.alpha) * ce, "kd": kd, "ce": ce}


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-sample z-score of the logits (Sun et al., CVPR 2024): ``(z - mean(z)) / (std(z) + eps)``.

    Apply it to both the student's and the teacher's logits, then divide by the temperature and use
    :func:`kd_loss` or :func:`dkd_loss` as usual. ``std`` is the unbiased one (``torch.std``'s default), as in
    the paper's code, so each output row has mean 0 and unbiased std ``std / (std + eps)`` ≈ 1.

    Args:
        logits: ``[B, N]`` raw scores, N >= 2 (a single class has no std).
        eps: Added to the std; keeps constant rows finite (they map to all zeros).

    Returns:
        ``[B, N]`` standardised logits in float32, or float64 for float64 inputs.
    """
    z = logits.to(_compute_dtype(logits))
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True)
    return (z - mean) / (std + eps)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float = 1.0,
    beta: float = 8.0,
) -> dict[str, torch.Tensor]:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``.

    With ``p^T = softmax(z / T)`` over all N classes and ``y`` the label:

    - TCKD is the KL of the teacher's binary distribution ``[p_t^T[y], 1 - p_t^T[y]]`` from the student's;
    - NCKD is the KL among the N - 1 non-target classes, each model's distribution renormalised over them
      (``softmax`` at T of the logits with the target removed).

    Both are summed per sample, averaged over the batch and multiplied by ``T^2``. Everything is computed in
    log space; the target class is removed from the non-target softmax by an exact ``-inf`` mask, and terms
    whose teacher probability is 0 contribute exactly 0, so extreme logits give no NaN in values or gradients.

    Args:
        student_logits: ``[B, N]`` raw student scores, N >= 2.
        teacher_logits: ``[B, N]`` raw teacher scores (treated as constants).
        labels: ``[B]`` integer class indices.
        temperature: Softmax temperature T.
        alpha: Weight of TCKD.
        beta: Weight of NCKD.

    Returns:
        ``{"tckd": ..., "nckd": ..., "dkd": alpha * tckd + beta * nckd}`` scalars, float32 even under autocast
        (float64 inputs in float64).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"dkd_loss needs student and teacher logits of the same shape [B, N]; got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    b, n = student_logits.shape
    if n < 2:
        raise ValueError(f"dkd_loss needs at least 2 classes (it splits target from non-target); got N={n}")
    if labels.shape != (b,):
        raise ValueError(f"dkd_loss needs labels of shape [B]=({b},); got {tuple(labels.shape)}")
    t = temperature
    dtype = _compute_dtype(student_logits, teacher_logits)
    zs = student_logits.to(dtype) / t
    zt = teacher_logits.detach().to(dtype) / t
    idx = labels.long().unsqueeze(1)
    target = torch.zeros((b, n), dtype=torch.bool, device=student_logits.device).scatter_(1, idx, True)

    def parts(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 2]`` log of the binary (target, non-target) probabilities and ``[B, N]`` non-target log-softmax."""
        masked = z.masked_fill(target, float("-inf"))
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        log_binary = torch.cat([z.gather(1, idx) - lse, torch.logsumexp(masked, dim=-1, keepdim=True) - lse], 1)
        return log_binary, F.log_softmax(masked, dim=-1)

    bin_s, nt_s = parts(zs)
    bin_t, nt_t = parts(zt)
    tckd = _kl_terms(bin_t, bin_s).sum() / b * (t * t)
    nckd = _kl_terms(nt_t, nt_s).sum() / b * (t * t)
    return {"tckd": tckd, "nckd": nckd, "dkd": alpha * tckd + beta * nckd}


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    temperature: float,
    teacher_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """KD against a teacher stored as its top-k logits, on k + 1 buckets: the k stored classes and "the rest".

    Teacher buckets at temperature T: ``p_i = exp(v_i / T - teacher_lse)`` for the stored classes and
    ``p_rest = 1 - sum_i p_i``, computed as ``-expm1(logsumexp(v / T) - teacher_lse)``, never negative. Student
    buckets: ``log_softmax(z_s / T)`` at the stored indices, and for the rest the logsumexp of ``z_s / T`` over
    the classes not stored minus the one over all classes. The loss is ``T^2 * mean_b KL(teacher || student)``
    over the buckets; a bucket whose teacher probability is 0 contributes exactly 0 with a finite gradient.

    Special cases:

    - ``teacher_lse=None``: the teacher is renormalised over its k stored classes (its rest bucket is 0), so
      the student is pushed to put all its mass on those classes, in the teacher's proportions.
    - A stored ``teacher_lse`` smaller than ``logsumexp(v / T)`` (only possible through rounding, e.g. of values
      cached in fp16) is raised to it: the rest bucket is then 0 and the k buckets still sum to 1.
    - Rows whose indices cover all N classes (k = N) have no rest: the student's rest bucket is 0 and the
      teacher's is 0 whatever ``teacher_lse`` says. The loss then equals :func:`kd_loss` to rounding, in any order.

    Args:
        student_logits: ``[B, N]`` raw student scores.
        teacher_values: ``[B, k]`` the teacher's raw logits at ``teacher_indices`` (any float dtype, e.g. fp16;
            treated as constants).
        teacher_indices: ``[B, k]`` integer class indices, distinct within a row (as ``torch.topk`` gives).
        temperature: Softmax temperature T the loss uses (``teacher_lse`` must have been taken at the same T).
        teacher_lse: ``[B]`` logsumexp over all N teacher classes of ``z_t / T``, or None.

    Returns:
        Scalar loss, float32 even under autocast (float64 student logits give float64).
    """
    if student_logits.dim() != 2 or teacher_values.dim() != 2 or teacher_values.shape != teacher_indices.shape:
        raise ValueError(
            f"topk_kd_loss needs student logits [B, N] and teacher values/indices [B, k]; got "
            f"{tuple(student_logits.shape)}, {tuple(teacher_values.shape)} and {tuple(teacher_indices.shape)}"
        )
    b, n = student_logits.shape
    k = teacher_values.shape[1]
    if teacher_values.shape[0] != b or not 1 <= k <= n:
        raise ValueError(
            f"topk_kd_loss needs teacher values [B={b}, k] with 1 <= k <= N={n}; got {tuple(teacher_values.shape)}"
        )
    if teacher_indices.is_floating_point() or teacher_indices.is_complex():
        raise TypeError(f"teacher_indices must be an integer tensor; got {teacher_indices.dtype}")
    if teacher_lse is not None and teacher_lse.shape != (b,):
        raise ValueError(f"teacher_lse must have shape [B]=({b},); got {tuple(teacher_lse.shape)}")
    t = temperature
    extra = () if teacher_lse is None else (teacher_lse,)
    dtype = _compute_dtype(student_logits, teacher_values, *extra)
    idx = teacher_indices.long()
    stored = torch.zeros((b, n), dtype=torch.bool, device=student_logits.device).scatter_(1, idx, True)
    has_rest = ~stored.all(dim=1)  # [B]

    # Teacher: k bucket log-probabilities and the rest bucket's probability.
    vt = teacher_values.detach().to(dtype) / t
    lse_k = torch.logsumexp(vt, dim=1)
    lse = lse_k if teacher_lse is None else torch.maximum(teacher_lse.detach().to(dtype), lse_k)
    lse = torch.where(has_rest, lse, lse_k)
    log_p = vt - lse.unsqueeze(1)
    p_rest = torch.where(has_rest, -torch.expm1(lse_k - lse), torch.zeros((), dtype=dtype, device=lse.device))

    # Student: log-softmax at the stored classes, and the log of the mass on all the others.
    zs = student_logits.to(dtype) / t
    lse_s = torch.logsumexp(zs, dim=1)
    log_q = zs.gather(1, idx) - lse_s.unsqueeze(1)
    # Rows without a rest would take the logsumexp of only -inf (NaN gradient): give them a finite row instead
    # and discard its value below.
    others = torch.where(has_rest.unsqueeze(1), zs.masked_fill(stored, float("-inf")), torch.zeros_like(zs))
    log_q_rest = torch.where(has_rest, torch.logsumexp(others, dim=1) - lse_s, float("-inf"))

    log_p_rest = torch.log(p_rest)  # -inf where p_rest == 0, which _kl_terms turns into an exact 0 term
    kl = _kl_terms(log_p, log_q).sum() + _kl_terms(log_p_rest, log_q_rest).sum()
    return kl / b * (t * t)


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
    dtype = _compute_dtype(student_feature, teacher_feature)
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


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets: ``mean_b sum_n -targets[b, n] * log_softmax(logits)[b, n]``.

    Matches ``timm.loss.SoftTargetCrossEntropy``, except that a class with target 0 contributes exactly 0 even
    where its logit is -inf.

    Args:
        logits: ``[B, N]`` raw scores.
        targets: ``[B, N]`` probability rows (each summing to 1), as Mixup/CutMix produce.

    Returns:
        Scalar loss, float32 even under autocast (float64 inputs in float64).
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"soft_target_cross_entropy needs logits and targets of the same shape [B, N]; got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    dtype = _compute_dtype(logits, targets)
    log_q = F.log_softmax(logits.to(dtype), dim=-1)
    y = targets.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    return (-y * torch.where(y != 0, log_q, zero)).sum(dim=-1).mean()
