"""Parity: an exported artifact must give the logits of the PyTorch model it came from, on real images.

The check runs the artifact through its :mod:`slimforge.export.runtimes` runtime (the same code path the benchmark
times) over the validation images in a batch plan that exercises the dynamic batch axis: one image, then full
batches, then the partial remainder. It reports the largest absolute logit difference, the logit scale (largest
absolute reference logit), their ratio and the top-1 agreement; an artifact passes when the ratio is at most
``rtol`` (unless ``rtol`` is ``None``, as for int8 artifacts, which are not meant to match FP32 logits) and the
agreement at least ``min_agreement``. A check may hold a quantile of the per-image differences to ``rtol`` instead
of the largest one (``quantile`` < 1): an int8 graph emulated in ONNX Runtime computes what its fake-quant model
computes, yet on the odd image one activation sits on a rounding tie the two libraries break differently, and that
one-step difference travels to the logits. A wrong scale or a misplaced quantizer moves every image.

Example:
    >>> from slimforge.export.runtimes import get_runtime
    >>> from slimforge.export.verify import ParityConfig, batch_plan, check_parity, reference_logits
    >>> plan = batch_plan(len(images), 32)  # doctest: +SKIP
    >>> ref = reference_logits(model, images, plan)  # doctest: +SKIP
    >>> rt = get_runtime("ort-cpu")(); rt.load("out/model.onnx")  # doctest: +SKIP
    >>> check_parity(rt, images, ref, plan, ParityConfig(), "out/model.onnx").passed  # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from slimforge.export.runtimes import Runtime
from slimforge.train.errors import ExportError, first_line

logger = logging.getLogger(__name__)


@dataclass
class ParityConfig:
    """How exported logits are compared with the PyTorch model's."""

    rtol: float | None = 1e-4
    """Largest allowed ``max |exported - reference| / max |reference|`` over all images and classes; ``None``:
    not checked (only top-1 agreement is, e.g. for int8)."""
    min_agreement: float = 1.0
    """Smallest allowed fraction of images whose top-1 class is the same in both."""
    quantile: float = 1.0
    """Which quantile of the per-image relative differences (each image's ``max |exported - reference|`` over the
    logit scale) must be within ``rtol``: 1.0 is the largest (every image), 0.5 the median image."""
    batch_size: int = 32
    """Full-batch size of the plan; a 1-image batch and a partial last batch are added to test the dynamic axis."""

    def validate(self) -> list[str]:
        p = []
        if self.rtol is not None and not self.rtol > 0:
            p.append(f"rtol: {self.rtol} must be > 0")
        if not 0.0 <= self.min_agreement <= 1.0:
            p.append(f"min_agreement: {self.min_agreement} must be in [0, 1]")
        if not 0.0 < self.quantile <= 1.0:
            p.append(f"quantile: {self.quantile} must be in (0, 1]")
        if self.batch_size < 2:
            p.append(f"batch_size: {self.batch_size} must be >= 2 so batches of different sizes are run")
        return p


@dataclass
class ParityResult:
    """The outcome of one artifact's parity check (``to_dict`` is what the export report stores)."""

    artifact: str
    runtime: str
    num_images: int
    batch_sizes: list[int]
    """Distinct batch sizes that were run."""
    max_abs_diff: float
    logit_scale: float
    """``max |reference logit|``; the diff is judged relative to it."""
    rel_diff: float
    """``max_abs_diff / logit_scale``."""
    top1_agreement: float
    min_top1_margin: float
    """Smallest gap between the reference's top-1 and top-2 logits: a disagreement within it is a near tie."""
    rel_diff_at_quantile: float
    """The ``quantile``-th per-image relative difference (equal to ``rel_diff`` at quantile 1)."""
    matched: float
    """Fraction of images whose own relative difference is within ``rtol`` (1.0 when ``rtol`` is None)."""
    rtol: float | None
    quantile: float
    min_agreement: float
    passed: bool

    def summary(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        limit = "not checked" if self.rtol is None else f"limit {self.rtol:.0e}"
        if self.rtol is not None and self.quantile < 1.0:
            limit = f"{self.quantile:.0%} quantile {self.rel_diff_at_quantile:.2e}, {limit}"
        return (
            f"{self.artifact} [{self.runtime}]: {verdict}: rel diff {self.rel_diff:.2e} "
            f"(max abs {self.max_abs_diff:.2e} / logit scale {self.logit_scale:.3g}; {limit}), "
            f"top-1 agreement {self.top1_agreement:.4f} (limit {self.min_agreement}) on {self.num_images} images, "
            f"batch sizes {self.batch_sizes}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def batch_plan(num_images: int, batch_size: int) -> list[int]:
    """Batch sizes covering ``num_images``: ``[1, batch_size, ..., remainder]``.

    The leading single image and the trailing partial batch make sure an artifact whose batch axis was
    accidentally fixed at export time fails here, not in production.
    """
    if num_images < 1:
        return []
    plan, left = [1], num_images - 1
    while left > 0:
        plan.append(min(batch_size, left))
        left -= plan[-1]
    return plan


def reference_logits(model: nn.Module, images: torch.Tensor, plan: list[int]) -> np.ndarray:
    """The eager PyTorch model's logits, run in the same batches as the artifact.

    Args:
        model: The model in eval mode (CPU, FP32).
        images: ``[N, C, H, W]``.
        plan: Batch sizes summing to ``N`` (:func:`batch_plan`).

    Returns:
        ``[N, K]`` float32 logits.
    """
    out, start = [], 0
    with torch.inference_mode():
        for size in plan:
            logits = model(images[start : start + size])
            out.append((logits[0] if isinstance(logits, (tuple, list)) else logits).float().cpu().numpy())
            start += size
    return np.concatenate(out)


def run_batches(runtime: Runtime, images: torch.Tensor, plan: list[int]) -> np.ndarray:
    """``runtime``'s logits ``[N, K]`` for ``images`` ``[N, C, H, W]``, batch by batch as ``plan`` says.

    Raises:
        ExportError: a batch gives logits of the wrong shape (e.g. a batch axis fixed at export time).
    """
    out, start = [], 0
    host = images.numpy()
    for size in plan:
        try:
            logits = runtime.run(host[start : start + size])
        except Exception as e:  # runtimes raise their own types for shape errors
            shape = [size, *host.shape[1:]]
            raise ExportError(
                f"runtime {runtime.name} failed on an input of shape {shape}: {first_line(e)}",
                "the artifact does not take this input (batch size, channels or image size): export it from the "
                "model its model.json describes, with a dynamic batch axis (export/export.py does both)",
            ) from None
        if logits.ndim != 2 or logits.shape[0] != size:
            raise ExportError(
                f"runtime {runtime.name} returned logits of shape {list(logits.shape)} for a batch of {size}",
                "the artifact's batch axis is not dynamic or its output is not [B, num_classes]; re-export it",
            )
        out.append(logits)
        start += size
    return np.concatenate(out)


def _to_float(x: float) -> float:
    return float(x) if math.isfinite(x) else float("inf")


def compare_logits(
    reference: np.ndarray, candidate: np.ndarray, cfg: ParityConfig, artifact: str, runtime: str, plan: list[int]
) -> ParityResult:
    """Compares two ``[N, K]`` logit arrays (pure numpy; NaN or inf in ``candidate`` fails).

    Raises:
        ExportError: the shapes differ.
    """
    if reference.shape != candidate.shape:
        raise ExportError(
            f"{artifact}: logits have shape {list(candidate.shape)}, the PyTorch model's {list(reference.shape)}",
            "the artifact comes from a different model; re-export it",
        )
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    diff = np.abs(ref - cand)
    max_abs = _to_float(diff.max()) if np.isfinite(cand).all() else float("inf")
    scale = float(np.abs(ref).max())
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    agreement = float((ref.argmax(1) == cand.argmax(1)).mean())
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
    margin = float((top2[:, 1] - top2[:, 0]).min())
    per_image = np.where(np.isfinite(cand).all(1), diff.max(1), np.inf) / (scale if scale > 0 else 1.0)  # [N]
    matched = 1.0 if cfg.rtol is None else float((per_image <= cfg.rtol).mean())
    at_quantile = rel if cfg.quantile >= 1.0 else _to_float(float(np.quantile(per_image, cfg.quantile)))
    passed = (cfg.rtol is None or at_quantile <= cfg.rtol) and agreement >= cfg.min_agreement
    return ParityResult(
        artifact=artifact,
        runtime=runtime,
        num_images=int(ref.shape[0]),
        batch_sizes=sorted(set(plan)),
        max_abs_diff=max_abs,
        logit_scale=scale,
        rel_diff=rel,
        top1_agreement=agreement,
        min_top1_margin=margin,
        rel_diff_at_quantile=at_quantile,
        matched=matched,
        rtol=cfg.rtol,
        quantile=cfg.quantile,
        min_agreement=cfg.min_agreement,
        passed=bool(passed),
    )


def check_parity(
    runtime: Runtime, images: torch.Tensor, reference: np.ndarray, plan: list[int], cfg: ParityConfig, artifact: str
) -> ParityResult:
    """Runs a loaded artifact on ``images`` and compares with the reference logits.

    Args:
        runtime: A runtime with the artifact loaded.
        images: ``[N, C, H, W]`` validation images, preprocessed for the model.
        reference: ``[N, K]`` PyTorch logits for the same images (:func:`reference_logits`).
        plan: The batch sizes to run (:func:`batch_plan`).
        cfg: Tolerances.
        artifact: Name for the report.
    """
    result = compare_logits(reference, run_batches(runtime, images, plan), cfg, artifact, runtime.name, plan)
    (logger.info if result.passed else logger.error)("parity %s", result.summary())
    return result
