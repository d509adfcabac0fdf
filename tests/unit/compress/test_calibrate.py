"""Calibrators against independently computed ranges, on activations with known distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slimforge.compress.api import RecipeError
from slimforge.compress.quantize.calibrate import calibrate_
from slimforge.compress.quantize.fakequant import ActivationQuantizer


class _Probe(nn.Module):
    """One quantizer on the input: calibration sees exactly the tensors we feed."""

    def __init__(self, activations: str = "uint8") -> None:
        super().__init__()
        self.q = ActivationQuantizer(activations)

    def forward(self, x):
        return self.q(x)


def _batches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(64, 256, generator=g) for _ in range(4)]
    batches[2][0, 0] = 40.0  # one outlier far out in the tail
    return batches


def test_minmax_takes_everything_seen():
    probe, batches = _Probe(), _batches()
    assert calibrate_(probe, batches, "minmax") == 256
    everything = torch.cat(batches)
    assert float(probe.q.min_val) == float(everything.min()) and float(probe.q.max_val) == 40.0


def test_percentile_clips_the_tails():
    probe, batches = _Probe(), _batches()
    calibrate_(probe, batches, "percentile", percentile=99.9)
    values = torch.cat(batches).flatten().double().numpy()
    low, high = np.percentile(values, [0.1, 99.9])
    bin_width = (values.max() - values.min()) / 2048  # the histogram's resolution
    assert abs(float(probe.q.max_val) - high) <= 2 * bin_width
    assert abs(float(probe.q.min_val) - low) <= 2 * bin_width
    assert float(probe.q.max_val) < 5  # the outlier at 40 is given up


def test_entropy_gives_up_a_lone_outlier_but_keeps_a_uniform_range():
    probe = _Probe()
    calibrate_(probe, [b.abs() for b in _batches()], "entropy")  # one-sided, like activations after a ReLU
    assert 2.0 < float(probe.q.max_val) < 10.0  # the bulk of |N(0,1)| is kept, the outlier at 40 clipped
    uniform = [torch.rand(64, 256, generator=torch.Generator().manual_seed(i)) * 6 for i in range(4)]
    calibrate_(probe, uniform, "entropy")
    assert float(probe.q.max_val) > 5.5  # nothing to give up: nearly the whole range


def test_calibration_needs_images_and_a_known_method():
    with pytest.raises(RecipeError, match="0 calibration images"):
        calibrate_(_Probe(), [], "minmax")
    with pytest.raises(RecipeError, match="unknown calibrator"):
        calibrate_(_Probe(), _batches(), "mse")


def test_calibration_sees_float_activations_and_leaves_quantisation_on():
    probe = _Probe()
    calibrate_(probe, [torch.tensor([[0.0, 0.1234567, 1.0]])], "minmax")
    assert probe.q.enabled and not torch.equal(probe(torch.tensor([0.1234567])), torch.tensor([0.1234567]))


def test_entropy_trims_each_end_of_an_asymmetric_range_on_its_own():
    """uint8 activations after a hard-swish: the short negative side (down to -0.375) is kept whole, the long
    positive tail with an outlier is cut, and the spike of exact zeros does not drag the threshold down."""
    g = torch.Generator().manual_seed(0)
    batches = [nn.functional.hardswish(torch.randn(64, 256, generator=g) * 2) for _ in range(4)]
    batches[1][0, 0] = 40.0
    probe = _Probe("uint8")
    calibrate_(probe, batches, "entropy")
    assert float(probe.q.min_val) == pytest.approx(-0.375, abs=1e-3)
    assert 5.0 < float(probe.q.max_val) < 12.0
