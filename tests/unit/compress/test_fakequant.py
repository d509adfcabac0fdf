"""Fake-quant layers against independent float64 formulas: scales, zero points, rounding, batch-norm folding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slimforge.compress.quantize.fakequant import (
    ActivationQuantizer,
    QuantConv2d,
    fake_quantize_bias,
    fake_quantize_weight,
    freeze_bn_,
    weight_scale,
)


def reference_qparams(low: float, high: float, activations: str) -> tuple[float, int]:
    """Scale and zero point written out: the range widened to hold 0, uint8 asymmetric or int8 symmetric."""
    low, high = min(low, 0.0), max(high, 0.0)
    if activations == "int8":
        return max(-low, high) / 127.0, 0
    scale = (high - low) / 255.0
    return scale, int(min(max(round(-low / scale), 0), 255))


@pytest.mark.parametrize("activations", ["uint8", "int8"])
@pytest.mark.parametrize("low, high", [(-1.5, 3.0), (0.0, 6.0), (0.5, 2.0), (-4.0, -1.0)])
def test_activation_qparams_and_rounding(activations, low, high):
    q = ActivationQuantizer(activations)
    q.set_range(low, high)
    scale, zero = reference_qparams(low, high, activations)
    assert float(q.scale) == pytest.approx(scale, rel=1e-6) and int(q.zero_point) == zero
    x = torch.linspace(low - 1, high + 1, 997, dtype=torch.float32)
    qmin, qmax = (0, 255) if activations == "uint8" else (-128, 127)
    s = float(q.scale)
    expected = (np.clip(np.round(x.double().numpy() / s) + zero, qmin, qmax) - zero) * s
    got = q.eval()(x).double().numpy()
    # Off by one step only where x / s lands within float error of a .5 tie.
    off = np.abs(got - expected) > 1e-6 * max(abs(low), abs(high), 1)
    assert off.sum() <= 2 and (np.abs(got - expected)[off] <= s * 1.0001).all()
    assert 0.0 in q(torch.tensor([0.0])).tolist()  # zero is exactly representable (padding, ReLU outputs)


def test_observer_moves_by_its_momentum_and_stops_when_frozen():
    q = ActivationQuantizer("uint8", momentum=0.25).train()
    q(torch.tensor([-1.0, 2.0]))
    assert (float(q.min_val), float(q.max_val)) == (-1.0, 2.0)  # the first batch sets the range
    q(torch.tensor([-3.0, 6.0]))
    assert float(q.min_val) == pytest.approx(-1.5) and float(q.max_val) == pytest.approx(3.0)
    q.observing = False
    q(torch.tensor([-100.0, 100.0]))
    assert float(q.max_val) == pytest.approx(3.0)
    q.eval().observing = True
    q(torch.tensor([-100.0, 100.0]))  # eval mode never observes
    assert float(q.max_val) == pytest.approx(3.0)


def test_weights_are_int8_per_output_channel_and_symmetric():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 0.0]).reshape(-1, 1, 1, 1)
    scale = weight_scale(w)
    ref = w.double().abs().flatten(1).amax(1) / 127
    assert torch.allclose(scale.double(), torch.clamp(ref, min=1e-8), rtol=1e-6)
    q = fake_quantize_weight(w)
    codes = q / scale.reshape(-1, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127.001
    assert torch.equal(q[5], torch.zeros_like(q[5]))
    # Straight-through: the gradient passes unchanged (no weight is ever clipped: the scale covers max |w|).
    w.requires_grad_(True)
    fake_quantize_weight(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_bias_lands_on_the_int32_grid_of_input_times_weight_scale():
    b = torch.tensor([0.123456, -2.5, 7.0])
    s_in, s_w = torch.tensor(0.02), torch.tensor([0.001, 0.01, 0.003])
    q = fake_quantize_bias(b, s_in, s_w)
    step = (s_in * s_w).double()
    assert torch.allclose(q.double(), torch.round(b.double() / step) * step, atol=1e-9)
    assert fake_quantize_bias(b, None, s_w) is b


def _conv_bn(seed: int = 0) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight[3] = 0.0  # timm zero-initialises some: the folding must not divide by it
    return conv, bn


def test_folding_matches_conv_then_batch_norm_in_float64():
    conv, bn = _conv_bn()
    layer = QuantConv2d(conv, bn).double().eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    w, b = layer.folded()
    reference = bn.double().eval()(conv.double()(x))
    assert torch.allclose(nn.functional.conv2d(x, w, b, padding=1), reference, atol=1e-10)


def test_training_forward_uses_batch_statistics_until_batch_norm_freezes():
    conv, bn = _conv_bn()
    layer = QuantConv2d(conv, bn).train()
    x = torch.randn(16, 3, 8, 8)
    y = layer(x)
    # Batch statistics: every channel with a non-zero scale is normalised to mean ~ beta over the batch.
    assert torch.allclose(y.mean((0, 2, 3)), bn.bias, atol=1e-4)
    y.sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None
    freeze_bn_(layer)
    running = bn.running_mean.clone()
    layer(x)
    assert torch.equal(bn.running_mean, running)  # frozen: the exact folded convolution, statistics untouched
    with torch.no_grad():
        frozen = layer(x)
        layer.fold_()
        assert layer.bn is None and torch.allclose(layer(x), frozen, atol=1e-5)
