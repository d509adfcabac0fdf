"""DKD, logit standardisation, top-k KD, FitNets hints and soft-target CE against independent float64 formulas.

Every reference below is plain numpy with explicit per-sample loops (softmax as exp / sum, KL as
sum p * log(p / q)); reference gradients are central finite differences of those references.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimforge.train.losses import (
    HintProjector,
    dkd_loss,
    hint_loss,
    kd_loss,
    soft_target_cross_entropy,
    standardize_logits,
    topk_kd_loss,
)

B, N = 5, 7
SEEDS = [0, 1, 2]
VALUE_RTOL = 1e-9
GRAD_RTOL = 1e-6  # of the gradient's max-abs


# ---------------------------------------------------------------------------------------------- references


def np_softmax(row: np.ndarray) -> np.ndarray:
    e = np.array([math.exp(v) for v in row], dtype=np.float64)
    return e / e.sum()


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """sum_i p_i log(p_i / q_i), terms with p_i == 0 left out."""
    return float(sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0))


def ref_kd(zs: np.ndarray, zt: np.ndarray, t: float) -> float:
    return t * t * sum(np_kl(np_softmax(zt[b] / t), np_softmax(zs[b] / t)) for b in range(len(zs))) / len(zs)


def ref_dkd_per_sample(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, t: float) -> tuple[list, list, list]:
    """Per-sample TCKD, NCKD (without the T^2 factor) and the teacher's target probability p_t^T[y]."""
    tckd, nckd, p_target = [], [], []
    for b in range(len(zs)):
        ps, pt = np_softmax(zs[b] / t), np_softmax(zt[b] / t)
        c = int(y[b])
        tckd.append(np_kl(np.array([pt[c], 1.0 - pt[c]]), np.array([ps[c], 1.0 - ps[c]])))
        nckd.append(np_kl(np_softmax(np.delete(zt[b], c) / t), np_softmax(np.delete(zs[b], c) / t)))
        p_target.append(pt[c])
    return tckd, nckd, p_target


def ref_dkd(zs, zt, y, t, alpha, beta) -> dict[str, float]:
    tckd, nckd, _ = ref_dkd_per_sample(zs, zt, y, t)
    out = {"tckd": t * t * sum(tckd) / len(zs), "nckd": t * t * sum(nckd) / len(zs)}
    out["dkd"] = alpha * out["tckd"] + beta * out["nckd"]
    return out


def ref_topk(zs: np.ndarray, values: np.ndarray, indices: np.ndarray, t: float, lse: np.ndarray | None) -> float:
    """Bucket KL: k stored classes plus one bucket for the student's/teacher's mass on all other classes."""
    total = 0.0
    for b in range(len(zs)):
        ps = np_softmax(zs[b] / t)
        idx = [int(i) for i in indices[b]]
        if lse is None:
            p = np_softmax(values[b] / t)
        else:
            p = np.array([math.exp(v / t - lse[b]) for v in values[b]])
        p_rest = max(0.0, 1.0 - p.sum())
        q = np.array([ps[i] for i in idx])
        q_rest = sum(ps[i] for i in range(len(ps)) if i not in idx)
        total += np_kl(np.append(p, p_rest), np.append(q, q_rest))
    return t * t * total / len(zs)


def ref_standardize(z: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    out = np.empty_like(z)
    for b in range(len(z)):
        n = len(z[b])
        mean = sum(z[b]) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in z[b]) / (n - 1))
        out[b] = [(v - mean) / (std + eps) for v in z[b]]
    return out


def ref_adaptive_pool(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Adaptive average pooling: output cell i averages input rows floor(i*H/h) .. ceil((i+1)*H/h) - 1."""
    bs, cs, h_in, w_in = x.shape
    h_out, w_out = size
    out = np.zeros((bs, cs, h_out, w_out))
    for b in range(bs):
        for c in range(cs):
            for i in range(h_out):
                r0, r1 = (i * h_in) // h_out, -(-((i + 1) * h_in) // h_out)
                for j in range(w_out):
                    c0, c1 = (j * w_in) // w_out, -(-((j + 1) * w_in) // w_out)
                    out[b, c, i, j] = x[b, c, r0:r1, c0:c1].sum() / ((r1 - r0) * (c1 - c0))
    return out


def ref_hint(s: np.ndarray, te: np.ndarray) -> float:
    if s.ndim == 4:
        size = (min(s.shape[2], te.shape[2]), min(s.shape[3], te.shape[3]))
        s, te = ref_adaptive_pool(s, size), ref_adaptive_pool(te, size)
    diff = (s - te).ravel()
    return float(sum(d * d for d in diff) / len(diff))


def ref_soft_ce(z: np.ndarray, targets: np.ndarray) -> float:
    total = 0.0
    for b in range(len(z)):
        q = np_softmax(z[b])
        total += sum(-y * math.log(qq) for y, qq in zip(targets[b], q))
    return total / len(z)


def fd_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


def assert_grad_close(got: torch.Tensor, ref: np.ndarray) -> None:
    got = got.detach().numpy()
    scale = np.abs(ref).max()
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= GRAD_RTOL * scale, (got, ref)


def randn(seed: int, *shape: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_(True)


def assert_matches_reference(loss, x: torch.Tensor, ref) -> None:
    """``loss(x)`` (a float64 scalar) and its gradient in ``x`` against ``ref(x as NumPy)`` and its central finite
    differences."""
    xl = leaf(x)
    got = loss(xl)
    got.backward()
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref(x.numpy()), rel=VALUE_RTOL)
    assert_grad_close(xl.grad, fd_grad(ref, x.numpy()))


# ---------------------------------------------------------------------------------------------- standardize


@pytest.mark.parametrize("seed", SEEDS)
def test_standardize_logits_value_and_gradient_match_reference(seed):
    z = randn(seed, B, N)
    w = randn(seed + 100, B, N, scale=1.0)  # gradient of the scalar sum(w * standardize(z))
    zl = leaf(z)
    out = standardize_logits(zl)
    (out * w).sum().backward()
    ref = ref_standardize(z.numpy())
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=VALUE_RTOL, atol=1e-12)
    wn = w.numpy()
    assert_grad_close(zl.grad, fd_grad(lambda x: float((ref_standardize(x) * wn).sum()), z.numpy()))


def test_standardize_logits_rows_have_zero_mean_and_unit_std():
    z = randn(3, 16, 100) * 7 + 40
    out = standardize_logits(z)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(16, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.std(dim=1), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-6)
    assert standardize_logits(z.float()).dtype == torch.float32
    assert standardize_logits(z.half()).dtype == torch.float32  # reduced precision is upcast


@pytest.mark.parametrize("seed", SEEDS)
def test_standardized_kd_is_invariant_to_shift_and_positive_scale(seed):
    zs, zt = randn(seed, B, N), randn(seed + 1, B, N)
    t = 2.0

    def skd(s, te):
        return kd_loss(standardize_logits(s), standardize_logits(te), t).item()

    base = skd(zs, zt)
    assert base > 1e-3
    assert skd(zs, zt + 13.0) == pytest.approx(base, rel=1e-6)
    assert skd(zs, 5.0 * zt) == pytest.approx(base, rel=1e-6)
    assert skd(zs, 0.25 * zt - 3.0) == pytest.approx(base, rel=1e-6)
    assert skd(3.0 * zs + 1.0, zt) == pytest.approx(base, rel=1e-6)
    assert kd_loss(zs, 5.0 * zt, t).item() != pytest.approx(kd_loss(zs, zt, t).item(), rel=1e-3)  # plain KD is not


# ---------------------------------------------------------------------------------------------- DKD


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("part", ["tckd", "nckd", "dkd"])
def test_dkd_value_and_gradient_match_reference(seed, temperature, part):
    zs, zt = randn(seed, B, N), randn(seed + 1, B, N)
    y = torch.randint(0, N, (B,), generator=torch.Generator().manual_seed(seed))
    alpha, beta = 0.7, 3.0
    zl = leaf(zs)
    out = dkd_loss(zl, zt, y, temperature, alpha=alpha, beta=beta)
    out[part].backward()
    ztn, yn = zt.numpy(), y.numpy()
    ref = ref_dkd(zs.numpy(), ztn, yn, temperature, alpha, beta)
    for name in ("tckd", "nckd", "dkd"):
        assert out[name].dtype == torch.float64
        assert out[name].item() == pytest.approx(ref[name], rel=VALUE_RTOL)
    assert_grad_close(zl.grad, fd_grad(lambda x: ref_dkd(x, ztn, yn, temperature, alpha, beta)[part], zs.numpy()))


@pytest.mark.parametrize("seed", SEEDS)
def test_kd_decomposes_into_tckd_plus_weighted_nckd(seed):
    """Zhao et al. 2022, eq. (5): per sample, KD = TCKD + (1 - p_t^T[y]) * NCKD; DKD(1, 1) is not KD."""
    t = 3.0
    zs, zt = randn(seed, B, N), randn(seed + 1, B, N)
    y = torch.randint(0, N, (B,), generator=torch.Generator().manual_seed(seed))
    tckd, nckd, p_target = ref_dkd_per_sample(zs.numpy(), zt.numpy(), y.numpy(), t)
    for b in range(B):
        kd_b = ref_kd(zs.numpy()[b : b + 1], zt.numpy()[b : b + 1], t) / (t * t)
        assert kd_b == pytest.approx(tckd[b] + (1.0 - p_target[b]) * nckd[b], rel=1e-12)
        # The same identity through the implementation, one sample at a time.
        parts = dkd_loss(zs[b : b + 1], zt[b : b + 1], y[b : b + 1], t)
        kd_impl = kd_loss(zs[b : b + 1], zt[b : b + 1], t).item()
        assert kd_impl == pytest.approx(parts["tckd"].item() + (1.0 - p_target[b]) * parts["nckd"].item(), rel=1e-12)
    parts = dkd_loss(zs, zt, y, t, alpha=1.0, beta=1.0)
    assert parts["dkd"].item() != pytest.approx(kd_loss(zs, zt, t).item(), rel=1e-3)


def test_dkd_treats_teacher_as_constant_and_is_zero_for_identical_logits():
    z = randn(4, B, N)
    teacher = leaf(z)
    out = dkd_loss(leaf(z), teacher, torch.arange(B) % N, 2.0)
    for v in out.values():
        assert v.item() == pytest.approx(0.0, abs=1e-14)
    out["dkd"].backward()
    assert teacher.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dkd_extreme_logits_give_finite_values_and_gradients(dtype):
    g = torch.Generator().manual_seed(5)
    zs = (torch.randint(0, 2, (B, N), generator=g) * 2 - 1).to(dtype) * 1e4
    zt = (torch.randint(0, 2, (B, N), generator=g) * 2 - 1).to(dtype) * 1e4
    zt[0] = -1e4
    zt[0, 2] = 1e4  # teacher certain of the target: its non-target mass underflows to 0
    zs[1] = zt[1]  # identical rows: zero contribution
    y = torch.tensor([2, 0, 1, 6, 3])
    for t in (1.0, 4.0):
        for part in ("tckd", "nckd", "dkd"):
            zl = leaf(zs)
            out = dkd_loss(zl, zt, y, t)
            out[part].backward()
            assert all(torch.isfinite(v) for v in out.values()), out
            assert torch.isfinite(zl.grad).all()
            assert out[part].dtype == dtype


def test_dkd_fp16_inputs_are_computed_in_float32():
    zs, zt = randn(6, B, N).half(), randn(7, B, N).half()
    y = torch.arange(B)
    out = dkd_loss(zs, zt, y, 4.0)
    ref = ref_dkd(zs.double().numpy(), zt.double().numpy(), y.numpy(), 4.0, 1.0, 8.0)
    assert out["dkd"].dtype == torch.float32
    assert out["dkd"].item() == pytest.approx(ref["dkd"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- top-k KD


def full_lse(zt: torch.Tensor, t: float) -> torch.Tensor:
    return torch.logsumexp(zt / t, dim=1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_lse", [True, False])
def test_topk_with_all_classes_equals_kd_in_any_index_order(seed, with_lse):
    t = 2.5
    zs, zt = randn(seed, B, N), randn(seed + 1, B, N)
    values, indices = torch.topk(zt, k=N, dim=1)
    perm = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(seed + r)) for r in range(B)])
    shuffled_v, shuffled_i = values.gather(1, perm), indices.gather(1, perm)
    lse = full_lse(zt, t) if with_lse else None
    a, b = leaf(zs), leaf(zs)
    kd = kd_loss(a, zt, t)
    kd.backward()
    for v, i in ((values, indices), (shuffled_v, shuffled_i)):
        b.grad = None
        got = topk_kd_loss(b, v, i, t, teacher_lse=lse)
        got.backward()
        assert got.item() == pytest.approx(kd.item(), rel=1e-12)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12 * a.grad.abs().max().item())


def test_topk_with_all_classes_ignores_a_slightly_wrong_lse():
    """At k = N there is no rest; an lse an ulp (or more) off must not create one (it would be infinite KL)."""
    t = 2.0
    zs, zt = randn(8, B, N), randn(9, B, N)
    values, indices = torch.topk(zt, k=N, dim=1)
    kd = kd_loss(zs, zt, t).item()
    for delta in (1e-15, 1e-9, -1e-9):
        got = topk_kd_loss(zs, values, indices, t, teacher_lse=full_lse(zt, t) + delta)
        assert got.item() == pytest.approx(kd, rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("with_lse", [True, False])
def test_topk_value_and_gradient_match_bucket_reference(seed, k, with_lse):
    t = 3.0
    zs, zt = randn(seed, B, N), randn(seed + 1, B, N)
    values, indices = torch.topk(zt, k=k, dim=1)
    lse = full_lse(zt, t) if with_lse else None
    vn, in_ = values.numpy(), indices.numpy()
    ln = None if lse is None else lse.numpy()
    assert_matches_reference(
        lambda x: topk_kd_loss(x, values, indices, t, teacher_lse=lse), zs, lambda x: ref_topk(x, vn, in_, t, ln)
    )


def test_topk_without_lse_is_kd_against_the_renormalised_teacher_with_an_empty_rest():
    t = 2.0
    zs, zt = randn(10, B, N), randn(11, B, N)
    values, indices = torch.topk(zt, k=3, dim=1)
    got = topk_kd_loss(zs, values, indices, t)
    # Teacher mass only on the stored classes: the same as an lse computed over them alone.
    same = topk_kd_loss(zs, values, indices, t, teacher_lse=torch.logsumexp(values / t, dim=1))
    assert got.item() == pytest.approx(same.item(), rel=1e-12)
    # With the true lse the teacher keeps its rest mass, which changes the loss.
    with_rest = topk_kd_loss(zs, values, indices, t, teacher_lse=full_lse(zt, t))
    assert torch.isfinite(got) and got.item() != pytest.approx(with_rest.item(), rel=1e-3)


def test_topk_accepts_fp16_values_and_narrow_integer_indices():
    t = 4.0
    zs, zt = randn(12, B, N), randn(13, B, N)
    values, indices = torch.topk(zt, k=4, dim=1)
    v16 = values.half()
    lse = full_lse(zt, t).half()
    for idx in (indices, indices.int(), indices.short()):
        got = topk_kd_loss(zs, v16, idx, t, teacher_lse=lse)
        assert got.dtype == torch.float64  # the student's precision wins
        # fp16 rounding of the lse can make it smaller than the stored values' logsumexp: the reference is taken
        # with the larger of the two, as documented.
        vn = v16.double().numpy()
        lse_k = np.array([math.log(sum(math.exp(v / t) for v in row)) for row in vn])
        ln = np.maximum(lse.double().numpy(), lse_k)
        assert got.item() == pytest.approx(ref_topk(zs.numpy(), vn, idx.numpy(), t, ln), rel=VALUE_RTOL)
    got32 = topk_kd_loss(zs.float(), v16, indices, t, teacher_lse=lse)
    assert got32.dtype == torch.float32
    with pytest.raises(TypeError, match="integer"):
        topk_kd_loss(zs, v16, indices.half(), t)


def test_topk_with_an_lse_below_the_stored_values_keeps_the_buckets_normalised():
    t = 1.0
    zs, zt = randn(14, B, N), randn(15, B, N)
    values, indices = torch.topk(zt, k=3, dim=1)
    too_small = torch.logsumexp(values / t, dim=1) - 0.01
    got = topk_kd_loss(zs, values, indices, t, teacher_lse=too_small)
    assert got.item() == pytest.approx(topk_kd_loss(zs, values, indices, t).item(), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, N])
@pytest.mark.parametrize("with_lse", [True, False])
def test_topk_extreme_logits_give_finite_values_and_gradients(dtype, k, with_lse):
    g = torch.Generator().manual_seed(16)
    zs = (torch.randint(0, 2, (B, N), generator=g) * 2 - 1).to(dtype) * 1e4
    zt = (torch.randint(0, 2, (B, N), generator=g) * 2 - 1).to(dtype) * 1e4
    zt[0] = -1e4
    zt[0, 3] = 1e4  # teacher rest mass underflows to exactly 0
    zs[1] = -1e4  # student rest mass (nearly) all there is
    for t in (1.0, 4.0):
        values, indices = torch.topk(zt, k=k, dim=1)
        lse = full_lse(zt, t) if with_lse else None
        zl = leaf(zs)
        got = topk_kd_loss(zl, values, indices, t, teacher_lse=lse)
        got.backward()
        assert torch.isfinite(got) and got.dtype == dtype
        assert torch.isfinite(zl.grad).all()


def test_topk_zero_rest_contributes_exactly_zero():
    """Teacher rest bucket 0 (its mass all on the stored class): the rest term vanishes, whatever the student has."""
    t = 1.0
    zt = torch.full((1, N), -1e4, dtype=torch.float64)
    zt[0, 0] = 0.0
    zs = leaf(randn(17, 1, N))
    got = topk_kd_loss(zs, zt[:, :1], torch.zeros(1, 1, dtype=torch.long), t, teacher_lse=full_lse(zt, t))
    got.backward()
    ps = torch.softmax(zs.detach(), dim=1)
    assert got.item() == pytest.approx(-math.log(ps[0, 0].item()), rel=1e-12)  # KL([1, 0] || [q_0, 1 - q_0])
    expected = ps.clone()
    expected[0, 0] -= 1.0
    torch.testing.assert_close(zs.grad, expected, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------- hints


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [
        ((2, 3, 4, 4), (2, 3, 4, 4)),
        ((2, 3, 8, 8), (2, 3, 4, 4)),
        ((2, 3, 3, 3), (2, 3, 6, 6)),
        ((2, 3, 6, 5), (2, 3, 4, 4)),
        ((B, N), (B, N)),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_hint_loss_value_and_gradient_match_reference(s_shape, t_shape, seed):
    s = randn(seed, *s_shape, scale=1.0)
    te = randn(seed + 1, *t_shape, scale=1.0)
    tn = te.numpy()
    assert_matches_reference(lambda x: hint_loss(x, te), s, lambda x: ref_hint(x, tn))


def test_hint_loss_pools_the_larger_student_map_to_the_teacher_size():
    s = randn(2, 2, 3, 8, 8)
    te = randn(3, 2, 3, 4, 4)
    blocks = s.numpy().reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5))  # 2x2 block means
    assert hint_loss(s, te).item() == pytest.approx(float(((blocks - te.numpy()) ** 2).mean()), rel=1e-12)
    # Not the same as upsampling the teacher, or as comparing unrelated crops.
    up = F.interpolate(te, size=(8, 8), mode="nearest")
    assert hint_loss(s, te).item() != pytest.approx(F.mse_loss(s, up).item(), rel=1e-3)


def test_hint_loss_mismatched_channels_raise_with_both_shapes():
    s, te = torch.zeros(2, 16, 4, 4), torch.zeros(2, 32, 4, 4)
    with pytest.raises(ValueError) as err:
        hint_loss(s, te)
    msg = str(err.value)
    assert "(2, 16, 4, 4)" in msg and "(2, 32, 4, 4)" in msg and "projector" in msg.lower()
    with pytest.raises(ValueError, match=r"\(2, 16\).*\(2, 32\)"):
        hint_loss(torch.zeros(2, 16), torch.zeros(2, 32))
    with pytest.raises(ValueError):
        hint_loss(torch.zeros(2, 16, 4, 4), torch.zeros(2, 16))


def test_hint_loss_treats_teacher_as_constant_and_upcasts_half():
    te = leaf(randn(4, 2, 3, 4, 4))
    s = leaf(randn(5, 2, 3, 4, 4))
    hint_loss(s, te).backward()
    assert te.grad is None and s.grad is not None
    assert hint_loss(s.detach().half(), te.detach().half()).dtype == torch.float32


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_gradients_flow_into_the_hint_projector(kind):
    torch.manual_seed(0)
    proj = HintProjector(8, 16, kind=kind)
    student_feature = torch.randn(4, 8, 6, 6) if kind == "conv" else torch.randn(4, 8)
    teacher_feature = torch.randn(4, 16, 3, 3) if kind == "conv" else torch.randn(4, 16)
    loss = hint_loss(proj(student_feature), teacher_feature)
    loss.backward()
    grads = [p.grad for p in proj.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    if kind == "conv":
        conv = proj.proj[0]
        assert conv.kernel_size == (1, 1) and conv.bias is None
        assert isinstance(proj.proj[1], torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="kind"):
        HintProjector(8, 16, kind="mlp")


# ---------------------------------------------------------------------------------------------- soft-target CE


def soft_targets(seed: int) -> torch.Tensor:
    """Mixup-like rows: lam * onehot(a) + (1 - lam) * onehot(b), lightly smoothed, summing to 1."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, N, (B,), generator=g), torch.randint(0, N, (B,), generator=g)
    lam = torch.rand(B, 1, generator=g, dtype=torch.float64)
    y = lam * F.one_hot(a, N).double() + (1 - lam) * F.one_hot(b, N).double()
    return 0.9 * y + 0.1 / N


@pytest.mark.parametrize("seed", SEEDS)
def test_soft_target_cross_entropy_value_and_gradient_match_reference(seed):
    z, y = randn(seed, B, N), soft_targets(seed)
    yn = y.numpy()
    assert_matches_reference(lambda x: soft_target_cross_entropy(x, y), z, lambda x: ref_soft_ce(x, yn))


def test_soft_target_cross_entropy_matches_timm_in_float32():
    timm_loss = pytest.importorskip("timm.loss")
    z, y = randn(20, B, N).float(), soft_targets(20).float()
    za, zb = leaf(z), leaf(z)
    ours = soft_target_cross_entropy(za, y)
    theirs = timm_loss.SoftTargetCrossEntropy()(zb, y)
    ours.backward()
    theirs.backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-6, atol=1e-7)


def test_soft_target_cross_entropy_ignores_impossible_classes_with_zero_target():
    z = leaf(torch.tensor([[0.0, 1.0, float("-inf")]], dtype=torch.float64))
    y = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    got = soft_target_cross_entropy(z, y)
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(z.grad).all()
    assert got.item() == pytest.approx(ref_soft_ce(np.array([[0.0, 1.0]]), np.array([[0.5, 0.5]])), rel=1e-12)


# ---------------------------------------------------------------------------------------------- kd_loss


def test_kd_loss_float32_output_unchanged_and_float64_stays_float64():
    zs, zt = randn(21, B, N).float(), randn(22, B, N).float()
    t = 4.0
    old = F.kl_div(
        F.log_softmax(zs.float() / t, dim=-1),
        F.log_softmax(zt.float() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    assert torch.equal(kd_loss(zs, zt, t), old)
    assert torch.equal(kd_loss(zs.half(), zt.half(), t), kd_loss(zs.half().float(), zt.half().float(), t))
    z64 = kd_loss(zs.double(), zt.double(), t)
    assert z64.dtype == torch.float64
    assert z64.item() == pytest.approx(ref_kd(zs.double().numpy(), zt.double().numpy(), t), rel=1e-12)
