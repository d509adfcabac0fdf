"""Distillation losses.

Logit distillation after Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network":

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

``alpha`` weights the **distillation** term; ``1 - alpha`` weights the hard-label cross-entropy. The ``T^2``
factor keeps the soft term's gradient magnitude independent of the temperature (§2.1 of the paper): at high
``T`` with zero-mean logits, d(T^2 * KL)/dz_s ≈ (z_s - z_t) / N per sample, N the number of classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossConfig:
    """Loss terms of supervised and distillation training."""

    temperature: float = 4.0
    """Softmax temperature T of the distillation term (distill.py only)."""
    alpha: float = 0.9
    """Weight of the distillation term; the hard-label cross-entropy gets 1 - alpha (distill.py only)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy term."""

    def validate(self) -> list[str]:
        p = []
        if self.temperature <= 0:
            p.append(f"temperature: {self.temperature} must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            p.append(f"alpha: {self.alpha} must be in [0, 1] (it weights the distillation term)")
        if not 0.0 <= self.label_smoothing < 1.0:
            p.append(f"label_smoothing: {self.label_smoothing} must be in [0, 1)")
        return p


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled KL divergence of the student from the teacher, times ``T^2``, averaged over the batch.

    Args:
        student_logits: ``[B, N]`` raw student scores.
        teacher_logits: ``[B, N]`` raw teacher scores (treated as constants).
        temperature: Softmax temperature T.

    Returns:
        Scalar ``T^2 * mean_b KL(p_t^T || p_s^T)``, computed in float32 even under autocast.

    Example:
        >>> z = torch.randn(4, 10)
        >>> float(kd_loss(z, z, 4.0)) < 1e-6
        True
    """
    t = temperature
    # Softmax/KL in reduced precision lose the small differences KD is made of: compute them in fp32.
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
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
