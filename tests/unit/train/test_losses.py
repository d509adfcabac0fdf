"""KD loss against an independent float64 formula, and Hinton et al.'s high-temperature limit."""

from __future__ import annotations

import math

import pytest
import torch

from slimforge.train.losses import LossConfig, distillation_loss, kd_loss


def reference_kd(zs: list[list[float]], zt: list[list[float]], t: float) -> float:
    """T^2 * mean_b sum_i p_t log(p_t / p_s), written out with Python floats (float64)."""
    total = 0.0
    for s_row, t_row in zip(zs, zt):
        es = [math.exp(v / t) for v in s_row]
        et = [math.exp(v / t) for v in t_row]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    return t * t * total / len(zs)


def reference_kd_grad(zs: list[list[float]], zt: list[list[float]], t: float) -> list[list[float]]:
    """d/dz_s of the batch-mean loss: T * (p_s - p_t) / B (softmax-KL gradient, chain rule through z/T)."""
    out = []
    for s_row, t_row in zip(zs, zt):
        es = [math.exp(v / t) for v in s_row]
        et = [math.exp(v / t) for v in t_row]
        out.append([t * (a / sum(es) - b / sum(et)) / len(zs) for a, b in zip(es, et)])
    return out


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 10.0])
def test_kd_loss_and_gradient_match_float64_reference(temperature):
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(6, 7, generator=g) * 3
    zt = torch.randn(6, 7, generator=g) * 3
    zs_leaf = zs.clone().requires_grad_(True)
    loss = kd_loss(zs_leaf, zt, temperature)
    loss.backward()
    ref = reference_kd(zs.tolist(), zt.tolist(), temperature)
    ref_grad = torch.tensor(reference_kd_grad(zs.tolist(), zt.tolist(), temperature), dtype=torch.float64)
    assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(zs_leaf.grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def test_kd_gradient_approaches_logit_matching_at_high_temperature():
    """Hinton et al. 2015, §2.1: with zero-mean logits, d(T^2 KL)/dz_s -> (z_s - z_t) / N as T grows."""
    g = torch.Generator().manual_seed(1)
    n = 10
    zs = torch.randn(1, n, generator=g, dtype=torch.float64)
    zt = torch.randn(1, n, generator=g, dtype=torch.float64)
    zs, zt = zs - zs.mean(), zt - zt.mean()
    target = (zs - zt) / n
    errors = []
    for t in (1.0, 10.0, 100.0, 1000.0):
        z = zs.clone().requires_grad_(True)
        kd_loss(z, zt, t).backward()  # batch of 1: the per-sample gradient
        errors.append((z.grad - target).abs().max().item() / target.abs().max().item())
    assert errors[0] > 0.1  # at T=1 the approximation does not hold ...
    assert all(b < a for a, b in zip(errors, errors[1:]))  # ... it improves monotonically with T ...
    assert errors[-1] < 1e-3  # ... and holds at high temperature.


def test_distillation_loss_alpha_weights_the_kd_term():
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    parts = distillation_loss(zs, zt, y, LossConfig(temperature=3.0, alpha=0.7))
    ce = torch.nn.functional.cross_entropy(zs, y)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert parts["kd"].item() == pytest.approx(reference_kd(zs.tolist(), zt.tolist(), 3.0), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(0.7 * parts["kd"].item() + 0.3 * ce.item(), rel=1e-6)
    only_kd = distillation_loss(zs, zt, y, LossConfig(temperature=3.0, alpha=1.0))
    assert only_kd["loss"].item() == pytest.approx(only_kd["kd"].item(), rel=1e-6)


def test_kd_loss_ignores_teacher_gradient_and_is_zero_for_identical_logits():
    z = torch.randn(4, 6)
    teacher = z.clone().requires_grad_(True)
    loss = kd_loss(z.clone().requires_grad_(True), teacher, 2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert teacher.grad is None
