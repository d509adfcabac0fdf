"""``sparsity``: the smallest weights held at exactly zero on the cubic schedule, folded into plain weights."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from slimforge.compress.api import CompressionContext, RecipeError, rebuild
from slimforge.compress.compress import main as compress_main
from slimforge.compress.prune.unstructured import WeightMask, cubic_sparsity
from slimforge.export.evaldata import ValidationSet
from slimforge.export.oneshot import SPARSITY_NOTE, OneShotConfig
from slimforge.train.checkpoint import load_checkpoint
from slimforge.train.config import from_dict
from slimforge.train.recipe import build_methods, step_problems
from tests.conftest import ROOT, fresh_process_logits, make_checkpoint, tiny_data_config

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def tiny_net(seed: int = 0) -> nn.Sequential:
    """Stem, two inner convolutions (the second's weights ten times larger), classifier: 432 + 2,304 + 4,608 + 320
    weights."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    with torch.no_grad():
        net[4].weight.mul_(10)  # a layer of larger weights: a global ranking prunes it less
    return net


def sparsity_step(total_steps: int | None = None, model: nn.Module | None = None, **options):
    (step,) = build_methods([{"method": "sparsity", **options}])
    model = tiny_net() if model is None else model
    model = step.prepare(model, CompressionContext(example_input=X[:1], total_steps=total_steps))
    return step, model


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.mask.clone() for n, m in model.named_modules() if isinstance(m, WeightMask)}


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def test_the_schedule_is_zhu_and_gupta_cubic():
    """s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3 with s_i = 0.1, s_f = 0.8, t0 = 10, t1 = 110, by hand."""
    expected = {0: 0.0, 9: 0.0, 10: 0.1, 35: 0.8 - 0.7 * 0.421875, 60: 0.8 - 0.7 * 0.125, 85: 0.8 - 0.7 / 64, 110: 0.8}
    for t, s in expected.items():
        assert cubic_sparsity(t, 0.1, 0.8, 10, 110) == pytest.approx(s, abs=1e-12), t
    assert cubic_sparsity(500, 0.1, 0.8, 10, 110) == 0.8

    # The handler: end_step null is the run's last update; masks move at start_step, every 25 updates, and the end.
    step, model = sparsity_step(110, sparsity=0.8, initial_sparsity=0.1, start_step=10, every=25, scope="layer")
    assert [t for t in range(0, 200) if step.is_update(t)] == [10, 35, 60, 85, 110]
    layer = model[2]
    assert zeros(layer.weight) == 0  # dense before start_step
    for t in (10, 35, 60, 85, 110):
        step.on_step(model, t)
        assert abs(zeros(layer.weight) - expected[t] * layer.weight.numel()) <= 1, t


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_the_target_is_reached_within_one_weight(scope):
    step, model = sparsity_step(sparsity=0.7, scope=scope)  # one-shot: the target at once, folded
    pruned = [model[2].weight, model[4].weight]
    assert zeros(model[0].weight) == 0 and zeros(model[8].weight) == 0  # stem and classifier stay dense
    assert not any(isinstance(m, WeightMask) for m in model.modules())
    total = sum(w.numel() for w in pruned)
    assert abs(sum(zeros(w) for w in pruned) - 0.7 * total) <= 1
    assert step.record["overall"] == pytest.approx(sum(zeros(w) for w in pruned) / total)
    assert set(step.record["sparsity"]) == {"2", "4"}
    small, large = (step.record["sparsity"][n] for n in ("2", "4"))
    if scope == "layer":
        for w in pruned:
            assert abs(zeros(w) - 0.7 * w.numel()) <= 1
    else:  # ranked together: the layer of small weights loses nearly all of them, the other far fewer
        assert small > 0.95 and large < 0.7


def test_pruned_weights_stay_zero_under_adamw_and_never_regrow():
    step, model = sparsity_step(12, sparsity=0.8, every=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    layer = model[2]
    original = layer.parametrizations.weight.original
    for t in range(1, 13):
        model(X).square().mean().backward()
        pruned = ~layer.parametrizations.weight[0].mask
        assert torch.all(original.grad[pruned] == 0)  # no gradient reaches a pruned weight
        optimizer.step()
        optimizer.zero_grad()
        before = masks(model)
        step.on_step(model, t)
        after = masks(model)
        for name in after:
            assert not torch.any(after[name] & ~before[name]), f"step {t}: a pruned weight of {name} came back"
        assert torch.all(layer.weight[~layer.parametrizations.weight[0].mask] == 0)
    # Even when the optimizer's stale moments push a pruned entry's stored value far up, it stays pruned.
    mask = layer.parametrizations.weight[0].mask
    with torch.no_grad():
        original[~mask] = 100.0
    step.on_step(model, 12)
    assert torch.equal(layer.parametrizations.weight[0].mask, mask) and torch.all(layer.weight[~mask] == 0)
    assert abs(step.sparsity_at(12) - 0.8) < 1e-12


def test_on_step_is_idempotent_and_resumes_from_a_state_dict():
    step, model = sparsity_step(20, sparsity=0.6, every=5)
    model(X).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    step.on_step(model, 10)
    at_10 = masks(model)
    step.on_step(model, 10)
    step.on_step(model, 11)  # not a scheduled update: nothing moves
    assert all(torch.equal(at_10[n], m) for n, m in masks(model).items())

    # The masks are module state: a fresh process prepares the same step, loads the state and resumes at step 10.
    state = model.state_dict()
    assert any(k.endswith("parametrizations.weight.0.mask") for k in state)
    resumed_step, resumed = sparsity_step(20, model=tiny_net(seed=1), sparsity=0.6, every=5)
    resumed.load_state_dict(state)
    resumed_step.on_step(resumed, 10)  # what the engine calls on resume
    assert all(torch.equal(at_10[n], m) for n, m in masks(resumed).items())
    with torch.no_grad():
        assert torch.equal(resumed(X), model(X))


def test_convert_leaves_plain_weights_with_exact_zeros_that_rebuild_from_the_record():
    step, model = sparsity_step(10, sparsity=0.75, every=2)
    for t in range(1, 11):
        step.on_step(model, t)
    model.eval()
    with torch.no_grad():
        masked = model(X)
    step.convert(model)
    assert all(
        type(m.weight) is nn.Parameter and not parametrize.is_parametrized(m) for m in model if hasattr(m, "weight")
    )
    assert set(model.state_dict()) == set(tiny_net().state_dict())
    assert step.record["overall"] == pytest.approx(0.75, abs=1 / 6912)
    assert torch.all(torch.signbit(model[4].weight[model[4].weight == 0]) == 0)  # +0.0: compresses as zeros do
    with torch.no_grad():
        assert torch.equal(model(X), masked)
    step.convert(model)  # converting twice changes nothing

    record = json.loads(json.dumps(step.step_record()))
    fresh = rebuild(tiny_net(seed=2), [record], from_dict)
    fresh.load_state_dict(model.state_dict())  # strict: the plain architecture
    with torch.no_grad():
        assert torch.equal(fresh.eval()(X), masked)

    record["record"]["sparsity"]["3"] = 0.5  # a ReLU, not a layer with weights
    with pytest.raises(RecipeError, match="sparsity recorded layer '3'") as e:
        rebuild(tiny_net(), [record], from_dict)
    assert "architecture and library version" in e.value.fix


def test_a_sparse_model_fine_tunes_with_its_zero_pattern_held():
    """``initial_sparsity`` = ``sparsity``: the mask computed at prepare is exactly the existing zeros."""
    _, sparse = sparsity_step(sparsity=0.7)
    pattern = {n: m.weight == 0 for n, m in sparse.named_modules() if n in ("2", "4")}
    step, model = sparsity_step(30, model=sparse, sparsity=0.7, initial_sparsity=0.7, every=10)
    for name, zero in pattern.items():
        assert torch.equal(model.get_submodule(name).parametrizations.weight[0].mask, ~zero)


def test_the_engine_passes_the_run_length_to_the_steps():
    from slimforge.train.engine.compression import RecipeRun

    recipe = RecipeRun([{"method": "sparsity", "sparsity": 0.5, "every": 7}], loaded=[])
    model = recipe.prepare(tiny_net(), X[:1], None, torch.device("cpu"), None, total_steps=30)
    (step,) = recipe.methods
    assert [t for t in range(40) if step.is_update(t)] == [0, 7, 14, 21, 28, 30]
    recipe.on_step(model, 30)
    assert abs(zeros(model[2].weight) + zeros(model[4].weight) - 0.5 * 6912) <= 1


@pytest.mark.parametrize("value", [0, 1, 1.5])
def test_a_sparsity_outside_zero_one_is_named_with_the_fix(value):
    problems = step_problems([{"method": "sparsity", "sparsity": value}])
    assert any(
        p.startswith(f"[0].sparsity: {float(value)} must be in (0, 1)") and "sparsity: 0.8" in p for p in problems
    )


def test_bad_schedules_and_topologies_are_refused():
    problems = step_problems([{"method": "sparsity", "start_step": 50, "end_step": 20, "every": 0}])
    assert any("end_step: 20 must be after start_step (50)" in p for p in problems)
    assert any("every: 0 must be >= 1" in p for p in problems)
    with pytest.raises(RecipeError, match="end_step 500 is after the run's last update \\(100\\)"):
        sparsity_step(100, end_step=500)
    with pytest.raises(RecipeError, match="no Conv2d or Linear layer to prune"):
        sparsity_step(skip=["*"])
    assert any(
        "remove end_step" in p for p in OneShotConfig(compress=[{"method": "sparsity", "end_step": 9}]).validate()
    )

    (step,) = build_methods([{"method": "sparsity"}])
    assert step.check_topology("DistributedType.MULTI_GPU", None) is None
    assert step.check_topology("DistributedType.DEEPSPEED", 2) is None
    for topology in (("DistributedType.DEEPSPEED", 3), ("DistributedType.FSDP", None)):
        assert "ZeRO-3 / FSDP shard the weights" in step.check_topology(*topology)
    assert "instead of DeepSpeed's fp32 masters" in step.check_topology("DistributedType.DEEPSPEED", 2, "float16")


MNIST = tiny_data_config()


def test_the_one_shot_entry_sparsifies_a_student_that_reloads_in_a_fresh_process(tmp_path, capsys):
    """``compress/compress.py`` with 80% sparsity on a resnet10t checkpoint: the compressed file shrinks, the dense
    figures do not, the report says why, and a fresh process rebuilds exactly the saved student. (A randomly
    initialised checkpoint: what is checked does not depend on training, and ``trained_resnet`` costs minutes of
    CPU when this file runs alone.)"""
    student = make_checkpoint(tmp_path / "student")
    out = tmp_path / "sparse"
    config = ROOT / "configs/compress/sparsity_80.yaml"
    args = ["--checkpoint", str(student), "--config", str(config), "--out", str(out), "rounds=1", "runs=5"]
    assert compress_main(args) == 0
    printed = capsys.readouterr().out
    assert "| checkpoint MB, zlib -6 |" in printed and SPARSITY_NOTE in printed
    report = json.loads((out / "compress_report.json").read_text())
    assert report["ratios"]["params"] == 1 and report["ratios"]["macs"] == 1
    assert report["ratios"]["file_mb"] == pytest.approx(1, abs=0.01)  # the same dense tensors
    assert report["ratios"]["zlib_mb"] < 0.5  # four in five of nearly all weights are zeros
    assert any(SPARSITY_NOTE in n for n in report["notes"])

    path = out / "checkpoint"
    model, spec, _ = load_checkpoint(path)
    (step,) = spec.recipe
    assert step["method"] == "sparsity" and step["record"]["overall"] == pytest.approx(0.8, abs=1e-6)
    layers = dict(model.named_modules())
    for name, share in step["record"]["sparsity"].items():
        assert zeros(layers[name].weight) == round(share * layers[name].weight.numel())
    images = ValidationSet(MNIST, 64).images_for(spec)
    with torch.no_grad():
        saved = model.eval()(images)
    logits, recipe = fresh_process_logits(path, images, tmp_path)
    assert recipe == ["sparsity"] and torch.equal(logits, saved)
