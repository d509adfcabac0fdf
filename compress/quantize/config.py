"""Typed options of the quantisation methods (``qat``, ``ptq``) and the deployment targets they can serve."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from slimforge.compress.api import MethodConfig

Backend = Literal["ort-cpu", "tensorrt"]
Activations = Literal["uint8", "int8"]

# What each deployment target's integer kernels take for activations (weights are always int8, symmetric, per
# output channel). ONNX Runtime's CPU kernels fuse QDQ convolutions and adds around uint8 (U8S8) activations;
# int8 (S8S8) activations are rewritten to uint8 only where a tensor has a single consumer, so every residual
# block keeps float kernels (9 of ResNet-18's 20 convolutions fused, no faster than FP32: docs/quantization.md).
# TensorRT takes symmetric int8 activations only.
BACKEND_ACTIVATIONS: dict[str, tuple[str, ...]] = {"ort-cpu": ("uint8",), "tensorrt": ("int8",)}


@dataclass
class QuantConfig(MethodConfig):
    """Options shared by quantisation-aware training and post-training quantisation."""

    backend: Backend = "ort-cpu"
    """The runtime the int8 model is for: ``ort-cpu`` (ONNX Runtime's CPU kernels) or ``tensorrt``."""
    activations: Activations | None = None
    """Activation type: ``uint8`` (asymmetric, per tensor) or ``int8`` (symmetric, zero point 0); null takes the
    backend's (uint8 for ort-cpu, int8 for tensorrt)."""
    skip: list[str] = field(default_factory=list)
    """Layer names (fnmatch patterns, e.g. ``head.*``) kept in floating point; a layer the backend cannot run in
    int8 must be listed here."""
    calibration_images: int = 256
    """Real training images whose activation ranges initialise (QAT) or set (PTQ) the scales. The ranges are taken
    over all of them together, so they do not depend on the micro-batch size or the number of processes."""

    def activation_type(self) -> str:
        """The activation type in effect: the configured one or the backend's."""
        return self.activations or BACKEND_ACTIVATIONS[self.backend][0]

    def validate(self) -> list[str]:
        p = []
        allowed = BACKEND_ACTIVATIONS[self.backend]
        if self.activations is not None and self.activations not in allowed:
            why = {
                "ort-cpu": "ONNX Runtime's CPU kernels fuse int8 (S8S8) activations only where a tensor has one "
                "consumer, so every residual block would stay in floating point",
                "tensorrt": "TensorRT quantises activations symmetrically (int8, zero point 0)",
            }[self.backend]
            p.append(
                f"activations: {self.activations} cannot be taken by backend {self.backend}: {why}; use "
                f"activations: {allowed[0]} (or leave it null), or another backend"
            )
        if self.calibration_images < 1:
            p.append(f"calibration_images: {self.calibration_images} must be >= 1 (scales come from real images)")
        return p


@dataclass
class QATConfig(QuantConfig):
    """Quantisation-aware training: fake-quantised weights and activations train with the task's loss."""

    freeze_observers_step: int | None = None
    """After this optimizer update the activation ranges stop moving; null keeps them tracking to the end."""
    freeze_bn_step: int | None = None
    """After this update batch norm uses its running statistics, folded exactly as deployed; null: never."""
    observer_momentum: float = 0.01
    """Weight of a new batch in the moving min/max of each activation (0 < m <= 1)."""

    def validate(self) -> list[str]:
        p = super().validate()
        for name in ("freeze_observers_step", "freeze_bn_step"):
            value = getattr(self, name)
            if value is not None and value < 0:
                p.append(f"{name}: {value} must be >= 0 or null")
        if not 0 < self.observer_momentum <= 1:
            p.append(f"observer_momentum: {self.observer_momentum} must be in (0, 1]")
        return p


@dataclass
class PTQConfig(QuantConfig):
    """Post-training quantisation: scales calibrated on real images, no training."""

    calibrator: Literal["minmax", "percentile", "entropy"] = "minmax"
    """How an activation's range is chosen from its calibration values: minmax (all of it), percentile (clip
    the tails beyond ``percentile``), entropy (the clipping that keeps the quantised distribution closest, in
    KL divergence, to the float one)."""
    percentile: float = 99.99
    """percentile calibrator: the percentage of values kept inside the range."""

    def validate(self) -> list[str]:
        p = super().validate()
        if not 50 < self.percentile <= 100:
            p.append(f"percentile: {self.percentile} must be in (50, 100]")
        return p
