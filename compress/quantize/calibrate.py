"""Calibration: activation ranges chosen from the float activations of real images.

Every :class:`ActivationQuantizer` is switched off (its input passes through in float) while the model runs the
calibration batches in eval mode; a hook collects what reaches each one. Then:

* ``minmax`` — the range is everything seen;
* ``percentile`` — the tails beyond the given percentage are clipped (from a 2048-bin histogram);
* ``entropy`` — the clipping threshold minimises the KL divergence between the float histogram and its quantised
  version (the method TensorRT's calibrator uses, Migacz 2017): outliers are given up when that keeps the bulk of
  the distribution finer. For uint8 (asymmetric) activations the two ends are trimmed independently, greedily
  from the lighter tail; for int8 (symmetric) ones, one threshold on ``|x|``. Exact zeros (after a ReLU) are left
  out of the histogram searched: zero is represented exactly at any scale, and that spike would otherwise push
  every threshold down.

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
        self.zeros = 0

    def minmax(self, x: torch.Tensor) -> None:
        self.low = min(self.low, float(x.min()))
        self.high = max(self.high, float(x.max()))

    def histogram(self, x: torch.Tensor) -> None:
        h = torch.histc(x.float().flatten(), bins=BINS, min=self.low, max=self.high)
        self.hist = h if self.hist is None else self.hist + h
        self.zeros += int((x == 0).sum())


def _percentile_range(c: _Collector, percentile: float) -> tuple[float, float]:
    import numpy as np

    cdf = np.cumsum(c.hist.double().numpy())
    cdf /= cdf[-1]
    edges = np.linspace(c.low, c.high, BINS + 1)
    tail = (100.0 - percentile) / 100.0
    low = edges[np.searchsorted(cdf, tail)] if c.low < 0 else c.low
    high = edges[min(np.searchsorted(cdf, 1.0 - tail) + 1, BINS)]
    return float(low), float(high)


def _kl(hist, start: int, end: int, levels: int) -> float:
    """KL divergence between ``hist`` clipped to bins ``[start, end)`` (the tails folded into the edge bins) and
    that window quantised to ``levels`` levels (each level's mass spread over its non-empty bins)."""
    import numpy as np

    window = hist[start:end].astype(np.float64)
    p = window.copy()
    p[0] += hist[:start].sum()
    p[-1] += hist[end:].sum()
    edges = np.linspace(0, len(window), levels + 1).astype(int)
    edges = np.unique(edges)
    sums = np.add.reduceat(window, edges[:-1])
    nonzero = np.add.reduceat((window > 0).astype(np.float64), edges[:-1])
    per_bin = np.where(nonzero > 0, sums / np.maximum(nonzero, 1), 0.0)
    q = np.repeat(per_bin, np.diff(edges)) * (window > 0)
    p, q = p / max(p.sum(), 1e-12), q / max(q.sum(), 1e-12)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


def _entropy_window(hist, levels: int, symmetric: bool, step: int = 16) -> tuple[int, int]:
    """The bin window ``[start, end)`` of ``hist`` with the smallest :func:`_kl` on a greedy path that narrows the
    window ``step`` bins at a time from the side with the lighter tail (both sides at once when ``symmetric``)."""
    start, end = 0, len(hist)
    best, best_window = _kl(hist, start, end, levels), (start, end)
    while end - start - (2 if symmetric else 1) * step >= levels:
        if symmetric:
            start, end = start + step, end - step
        elif hist[start : start + step].sum() <= hist[end - step : end].sum():
            start += step
        else:
            end -= step
        kl = _kl(hist, start, end, levels)
        if kl < best:
            best, best_window = kl, (start, end)
    return best_window


def _entropy_range(c: _Collector, q: ActivationQuantizer) -> tuple[float, float]:
    import numpy as np

    hist = c.hist.numpy().copy()
    edges = np.linspace(c.low, c.high, BINS + 1)
    # A ReLU's (or hard-swish's) exact zeros are represented exactly at any scale (the zero point holds 0): they
    # carry no quantisation error, and left in their bin they would dominate the divergence of every candidate.
    if c.low <= 0 <= c.high:
        zero_bin = min(int(np.searchsorted(edges, 0.0, side="right")) - 1, BINS - 1)
        hist[zero_bin] = max(hist[zero_bin] - c.zeros, 0.0)
    if q.activations == "int8":  # symmetric: search on |x|, one threshold for both sides
        top = max(-c.low, c.high)
        centers = (edges[:-1] + edges[1:]) / 2
        folded, _ = np.histogram(np.abs(centers), bins=BINS, range=(0, top), weights=hist)
        _, end = _entropy_window(np.concatenate([folded[::-1], folded]), q.qmax - q.qmin + 1, symmetric=True)
        threshold = top * (end - BINS) / BINS
        return max(c.low, -threshold), min(c.high, threshold)
    start, end = _entropy_window(hist, q.qmax - q.qmin + 1, symmetric=False)  # asymmetric: each end on its own
    return float(edges[start]), float(edges[end])


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
