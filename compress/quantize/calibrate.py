"""Calibration: activation ranges chosen from the float activations of real images.

Every :class:`ActivationQuantizer` is switched off (its input passes through in float) while the model runs the
calibration batches in eval mode; a hook collects what reaches each one. Then:

* ``minmax`` — the range is everything seen;
* ``percentile`` — the tails beyond the given percentage are clipped (from a 2048-bin histogram);
* ``entropy`` — the clipping threshold minimises the KL divergence between the float histogram and its quantised
  version (the method TensorRT's calibrator uses, Migacz 2017): outliers are given up when that keeps the bulk of
  the distribution finer.

Calibration runs the same batches on every rank, so it needs no communication.
"""

from __future__ import annotations

import torch
from torch import nn

from slimforge.compress.api import RecipeError
from slimforge.compress.quantize.fakequant import ActivationQuantizer, quantizers

CALIBRATORS = ("minmax", "percentile", "entropy")
BINS = 2048


class _Collector:
    """Running min/max, then a histogram over [min, max], of what reaches one quantizer."""

    def __init__(self) -> None:
        self.low, self.high = float("inf"), float("-inf")
        self.hist: torch.Tensor | None = None

    def minmax(self, x: torch.Tensor) -> None:
        self.low = min(self.low, float(x.min()))
        self.high = max(self.high, float(x.max()))

    def histogram(self, x: torch.Tensor) -> None:
        h = torch.histc(x.float().flatten(), bins=BINS, min=self.low, max=self.high)
        self.hist = h if self.hist is None else self.hist + h


def _percentile_range(c: _Collector, percentile: float) -> tuple[float, float]:
    import numpy as np

    cdf = np.cumsum(c.hist.double().numpy())
    cdf /= cdf[-1]
    edges = np.linspace(c.low, c.high, BINS + 1)
    tail = (100.0 - percentile) / 100.0
    low = edges[np.searchsorted(cdf, tail)] if c.low < 0 else c.low
    high = edges[min(np.searchsorted(cdf, 1.0 - tail) + 1, BINS)]
    return float(low), float(high)


def _kl_threshold(hist, levels: int) -> int:
    """The number of leading bins of ``hist`` (a numpy array) to keep so the ``levels``-level quantised histogram is
    closest to it in KL divergence."""
    import numpy as np

    best, best_bins = np.inf, len(hist)
    total = hist.sum()
    for bins in range(levels, len(hist) + 1, 16):
        p = hist[:bins].astype(np.float64).copy()
        p[-1] += hist[bins:].sum()  # the clipped tail lands in the last kept bin
        edges = np.linspace(0, bins, levels + 1).astype(int)
        starts = edges[:-1]
        sums = np.add.reduceat(hist[:bins].astype(np.float64), starts)
        nonzero = np.add.reduceat((hist[:bins] > 0).astype(np.float64), starts)
        per_bin = np.where(nonzero > 0, sums / np.maximum(nonzero, 1), 0.0)
        q = np.repeat(per_bin, np.diff(edges)) * (hist[:bins] > 0)
        p, q = p / total, q / max(q.sum(), 1e-12)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_bins = kl, bins
    return best_bins


def _entropy_range(c: _Collector, q: ActivationQuantizer) -> tuple[float, float]:
    import numpy as np

    if c.low >= 0:  # one-sided (after a ReLU): the histogram already is |x|
        hist, top, levels = c.hist.numpy(), c.high, q.qmax - q.qmin + 1
        kept = _kl_threshold(hist, levels)
        return c.low, c.low + (top - c.low) * kept / BINS
    # Two-sided: fold the histogram onto |x| and search a symmetric threshold.
    edges = np.linspace(c.low, c.high, BINS + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    top = max(-c.low, c.high)
    folded, _ = np.histogram(np.abs(centers), bins=BINS, range=(0, top), weights=c.hist.numpy())
    threshold = top * _kl_threshold(folded, (q.qmax - q.qmin + 1) // 2) / BINS
    return max(c.low, -threshold), min(c.high, threshold)


@torch.no_grad()
def calibrate_(
    model: nn.Module, batches: list[torch.Tensor], calibrator: str = "minmax", percentile: float = 99.99
) -> int:
    """Sets every activation quantizer's range from the float activations of ``batches``.

    Args:
        model: A fake-quantised model (:func:`slimforge.compress.quantize.graph.quantize_graph`).
        batches: ``[B, C, H, W]`` real images, preprocessed as the model expects.
        calibrator: ``minmax``, ``percentile`` or ``entropy``.
        percentile: Percentage of values kept inside the range (``percentile`` only).

    Returns:
        The number of images calibrated on.

    Raises:
        RecipeError: no images, or an unknown calibrator.
    """
    if calibrator not in CALIBRATORS:
        raise RecipeError(f"unknown calibrator {calibrator!r}", f"use one of {', '.join(CALIBRATORS)}")
    images = sum(len(b) for b in batches)
    if images == 0:
        raise RecipeError(
            "0 calibration images: activation ranges must come from real images",
            "give the run a training split with images (calibration_images / --calibration-images must be >= 1)",
        )
    qs = quantizers(model)
    collectors = {q: _Collector() for q in qs}
    was_training = model.training
    model.eval()

    def run(collect) -> None:
        hooks = [q.register_forward_pre_hook(lambda m, args, f=collect: f(collectors[m], args[0])) for q in qs]
        try:
            for batch in batches:
                model(batch)
        finally:
            for h in hooks:
                h.remove()

    for q in qs:
        q.enabled = False  # pass float activations through: ranges describe the float model
    try:
        run(_Collector.minmax)
        if calibrator != "minmax":
            run(_Collector.histogram)
    finally:
        for q in qs:
            q.enabled = True
        model.train(was_training)
    for q, c in collectors.items():
        if c.low > c.high:  # never reached (a branch these images do not take): keep a neutral range
            c.low = c.high = 0.0
        if calibrator == "percentile" and c.high > c.low:
            q.set_range(*_percentile_range(c, percentile))
        elif calibrator == "entropy" and c.high > c.low:
            q.set_range(*_entropy_range(c, q))
        else:
            q.set_range(c.low, c.high)
    return images
