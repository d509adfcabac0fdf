"""``lowrank``: SVD and Tucker-2 factors checked against independent float64 references, a MAC target met within
3%, and the factorised structure rebuilt from the record alone (including records of earlier versions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from torch import nn

from slimforge.compress.api import CompressionContext, RecipeError, rebuild
from slimforge.compress.lowrank.svd import svd_factorize
from slimforge.compress.lowrank.tucker import reconstruct, tucker2, tucker2_factorize
from slimforge.compress.stats import count_macs
from slimforge.export.artifacts import ExportConfig, export_checkpoint
from slimforge.export.evaldata import ValidationSet
from slimforge.train.checkpoint import load_checkpoint
from slimforge.train.config import from_dict
from slimforge.train.recipe import build_methods, step_problems
from tests.conftest import compress_checkpoint, fresh_process_logits, tiny_data_config


@pytest.fixture(autouse=True)
def one_thread():
    """The factorisations are small float64 LAPACK calls: on a 2-core machine shared with other runs, two OpenMP
    threads spinning against a busy core make eigh and SVD tens of times slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def factorise(model: nn.Module, example: torch.Tensor, **options) -> tuple[nn.Module, dict]:
    (step,) = build_methods([{"method": "lowrank", **options}])
    return step.prepare(model, CompressionContext(example_input=example)), step.step_record()


def product(pair: nn.Sequential, shape: torch.Size) -> torch.Tensor:
    """``W_r [out, in(, kh, kw)]`` of an SVD pair: the second factor ``[out, r]`` times the first ``[r, in·kh·kw]``."""
    return (pair[1].weight.flatten(1) @ pair[0].weight.flatten(1)).reshape(shape)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_svd_truncation_error_is_the_eckart_young_bound(kind):
    """The factorised layer is the best rank-r approximation: ||W - W_r||_F^2 is the sum of the discarded squared
    singular values (numpy, float64), and its factors multiply to numpy's truncated U_r S_r V_r^T."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(64, 48), torch.randn(2, 64)
    else:
        layer, x = nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.randn(1, 16, 12, 12)
    model = nn.Sequential(layer).double()
    w = layer.weight.detach().clone()
    factorised, step = factorise(model, x[:1].double(), rank_ratio=0.5)
    rank = step["record"]["ranks"]["0"]
    u, s, vh = np.linalg.svd(w.flatten(1).numpy(), full_matrices=False)
    assert rank == len(s) // 2

    w_r = product(factorised[0], w.shape).detach()
    error = float(((w - w_r) ** 2).sum())
    discarded = float((s[rank:] ** 2).sum())
    assert abs(error - discarded) <= 1e-5 * discarded, (error, discarded)
    reference = torch.from_numpy((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(w.shape)
    assert torch.allclose(w_r, reference, rtol=0, atol=1e-10 * float(reference.abs().max()))
    assert torch.equal(factorised[0][1].bias, layer.bias)


CONVS = {
    "stride2-bias": dict(in_channels=12, out_channels=20, kernel_size=3, stride=2, padding=1),
    "dilated-reflect": dict(in_channels=12, out_channels=20, kernel_size=3, padding=2, dilation=2,
                            padding_mode="reflect"),
    "rect-1xk-wide-input": dict(in_channels=30, out_channels=8, kernel_size=(1, 5), padding=(0, 2), bias=False),
}  # fmt: skip


@pytest.mark.parametrize("mode", ["svd", "tucker2"])
@pytest.mark.parametrize("conv", CONVS, ids=list(CONVS))
def test_full_rank_factorisations_compute_the_dense_layer(conv, mode):
    """At full rank, channel SVD, Tucker-2 (projection before padding: it commutes with every padding mode) and a
    Linear's SVD compute the dense layer. Float64 weights and inputs: the factors carry ~1e-15 relative roundoff,
    summed over at most 150 products per output, so 1e-10 of the output's scale passes any correct factorisation
    and fails a wrong one (a dropped rank or a misplaced stride is off by ~1e-1)."""
    torch.manual_seed(0)
    layer = nn.Conv2d(**CONVS[conv]).double()
    x = torch.randn(2, layer.in_channels, 11, 13, dtype=torch.float64)
    o, i, kh, kw = layer.weight.shape
    if mode == "svd":
        new = svd_factorize(layer, min(o, i * kh * kw))
    else:
        new = tucker2_factorize(layer, min(o, i * kh * kw), min(i, o * kh * kw))
    assert new[0].weight.dtype == torch.float64 and len(new) == (2 if mode == "svd" else 3)
    with torch.no_grad():
        dense, factorised = layer(x), new(x)
    assert dense.shape == factorised.shape
    assert torch.allclose(factorised, dense, rtol=0, atol=1e-10 * float(dense.abs().max()))

    linear = nn.Linear(24, 40).double()
    tokens = torch.randn(3, 5, 24, dtype=torch.float64)
    with torch.no_grad():
        dense = linear(tokens)
        assert torch.allclose(svd_factorize(linear, 24)(tokens), dense, rtol=0, atol=1e-10 * float(dense.abs().max()))


def test_tucker2_error_falls_with_either_rank_and_vanishes_at_full_rank():
    """HOSVD factors are nested, so its error cannot rise with a rank; HOOI refits can only lower it further."""
    torch.manual_seed(0)
    w = torch.randn(12, 10, 3, 3, dtype=torch.float64)
    w += 3 * torch.einsum("o,i,hw->oihw", torch.randn(12), torch.randn(10), torch.randn(3, 3))  # a dominant direction
    norm = float((w**2).sum())

    def error(r_out: int, r_in: int, iterations: int) -> float:
        return float(((w - reconstruct(*tucker2(w, r_out, r_in, iterations))) ** 2).sum()) / norm

    for iterations in (0, 2):
        grid = np.array([[error(ro, ri, iterations) for ri in range(1, 11)] for ro in range(1, 13)])
        assert (np.diff(grid, axis=0) <= 1e-12).all() and (np.diff(grid, axis=1) <= 1e-12).all(), grid
        assert grid[-1, -1] < 1e-24 and grid[0, 0] > 0.01
    assert all(error(r, r, 2) <= error(r, r, 0) + 1e-12 for r in range(1, 11))
    core, u_out, u_in = tucker2(w, 5, 4)
    assert core.shape == (5, 4, 3, 3) and torch.allclose(u_out.T @ u_out, torch.eye(5, dtype=torch.float64))


@pytest.mark.parametrize("conv", ["channel", "tucker2"])
def test_the_mac_target_is_met_within_3_percent_on_a_timm_model(conv):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    before = count_macs(model, (3, 32, 32))
    with torch.no_grad():
        dense = model.eval()(x)
    factorised, step = factorise(model, x[:1], macs=0.5, conv=conv)
    record = step["record"]
    after = count_macs(factorised, (3, 32, 32))
    assert 0.97 * 0.5 <= after / before <= 0.5, f"{after / before:.4f} of the MACs"
    assert record["macs_before"] == before and record["macs_after"] == after
    assert (len(record["tucker2"]) > 0) == (conv == "tucker2") and record["ranks"]
    if conv == "tucker2":  # 1x1 convolutions are matrices: SVD
        assert all(factorised.get_submodule(n)[1].kernel_size != (1, 1) for n in record["tucker2"])
    with torch.no_grad():
        out = factorised.eval()(x)
    assert out.shape == dense.shape and torch.isfinite(out).all()


class DepthwiseThenDense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.dense = nn.Conv2d(16, 64, 3, padding=1)
        self.unused = nn.Linear(256, 256)  # e.g. an auxiliary head this input does not reach

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.depthwise(x))


def test_grouped_convolutions_stay_whole_and_unrun_layers_are_left_alone():
    torch.manual_seed(0)
    factorised, step = factorise(DepthwiseThenDense(), torch.randn(1, 16, 8, 8), rank_ratio=0.25, conv="tucker2")
    assert step["record"]["tucker2"] == {"dense": {"out": 16, "in": 4}} and step["record"]["ranks"] == {}
    assert type(factorised.depthwise) is nn.Conv2d and type(factorised.unused) is nn.Linear


def test_a_target_that_cannot_be_met_is_refused_with_the_fix():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(RecipeError, match=r"at rank 1, not the 30% asked for") as e:
        factorise(model, x, macs=0.3, skip=["layer*", "conv1.*"])
    assert "factorise more layers" in e.value.fix

    # One Linear: rank 7 keeps 90.2% of its MACs, rank 8 costs more than the dense layer (kept whole: 100%).
    with pytest.raises(RecipeError, match=r"step from 90\.2% to 100\.0% of the MACs, past the 95% asked for") as e:
        factorise(nn.Sequential(nn.Linear(256, 8)), torch.randn(1, 256), macs=0.95)
    assert "ask for a macs outside that step" in e.value.fix


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"macs": 1.0}, "macs: 1.0 must be in (0, 1), the share of MACs kept"),
        ({"macs": 0}, "macs: 0.0 must be in (0, 1)"),
        ({"macs": 0.5, "energy": 0.9}, "energy/rank_ratio/macs: set exactly one of them"),
        ({"conv": "cp"}, "conv: 'cp' is not one of 'channel', 'tucker2'"),
    ],
)  # fmt: skip
def test_bad_options_are_named(options, needle):
    problems = step_problems([{"method": "lowrank", **options}])
    assert any(needle in p for p in problems), problems


def test_no_rank_option_means_energy_0_9():
    (step,) = build_methods([{"method": "lowrank", "conv": "tucker2"}])
    assert (step.config.energy, step.config.rank_ratio, step.config.macs) == (0.9, None, None)


def test_the_record_alone_rebuilds_the_structure_and_old_records_still_load():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    factorised, step = factorise(timm.create_model("resnet10t", num_classes=10), x[:1], macs=0.6, conv="tucker2")
    step = json.loads(json.dumps(step))  # as a checkpoint stores it
    fresh = rebuild(timm.create_model("resnet10t", num_classes=10), [step], from_dict)
    assert str(fresh) == str(factorised)
    fresh.load_state_dict(factorised.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), factorised.eval()(x))

    # A step as the earlier version wrote it: no conv/macs options, SVD ranks only.
    old_factorised, old = factorise(timm.create_model("resnet10t", num_classes=10), x[:1], energy=0.8)
    old = {"method": "lowrank", "config": {"energy": 0.8, "rank_ratio": None, "layers": ["*"], "skip": []},
           "record": {"ranks": old["record"]["ranks"]}}  # fmt: skip
    fresh = rebuild(timm.create_model("resnet10t", num_classes=10), [old], from_dict)
    fresh.load_state_dict(old_factorised.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), old_factorised.eval()(x))


@pytest.mark.parametrize(
    "record, needle",
    [
        ({"ranks": {"layer9.0.conv1": 4}}, "'layer9.0.conv1', which this architecture does not have"),
        ({"tucker2": {"fc": {"out": 4, "in": 4}}}, "Tucker-2 layer 'fc', which this architecture does not have"),
        ({"tucker2": {"layer1.0.conv1": [4, 4]}}, "recorded [4, 4] as the ranks of layer 'layer1.0.conv1'"),
        ({"ranks": {"fc": 0}}, "recorded 0 as the ranks of layer 'fc'"),
    ],
)  # fmt: skip
def test_a_record_that_does_not_fit_is_refused_naming_the_layer(record, needle):
    step = {"method": "lowrank", "config": {"energy": 0.9}, "record": record}
    with pytest.raises(RecipeError) as e:
        rebuild(timm.create_model("resnet10t", num_classes=10), [step], from_dict)
    assert needle in str(e.value)


def test_a_pruned_then_tucker2_factorised_student_reloads_in_a_fresh_process_and_exports(trained_resnet, tmp_path):
    """The trained student pruned to 60% of its MACs, then Tucker-2 factorised to 70% of what is left (the one-shot
    entry's steps through the methods' hooks, as tests/conftest.py drives them): a fresh process rebuilds the saved
    student from the checkpoint alone, and its ONNX export passes the parity gate."""
    steps = [{"method": "prune", "macs": 0.6}, {"method": "lowrank", "conv": "tucker2", "macs": 0.7}]
    path, model = compress_checkpoint(trained_resnet, tmp_path / "compressed", steps, updates=0)
    spec = load_checkpoint(path)[1]
    assert [s["method"] for s in spec.recipe] == ["prune", "lowrank"] and spec.recipe[1]["record"]["tucker2"]
    dense = load_checkpoint(trained_resnet)[0]
    ratio = count_macs(model, spec.input_size) / count_macs(dense, spec.input_size)
    assert 0.6 * 0.7 * 0.94 <= ratio <= 0.6 * 0.7 * 1.03, ratio  # prune lands within ±3%, lowrank within -3%

    images = ValidationSet(tiny_data_config(), 64).images_for(spec)
    with torch.no_grad():
        saved = model.eval()(images)
    logits, recipe = fresh_process_logits(path, images, tmp_path)
    assert recipe == ["prune", "lowrank"] and torch.equal(logits, saved)
    export = export_checkpoint(path, tmp_path / "export", ExportConfig(formats=["onnx"], max_images=64))
    assert export["artifacts"][0]["passed"]
