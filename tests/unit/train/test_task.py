"""Tasks: each registered task's losses from a batch, its adapters, and the combinations it refuses."""

from __future__ import annotations

import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimforge.train.errors import ConfigError
from slimforge.train.losses import (
    LossConfig,
    distillation_loss,
    dkd_loss,
    kd_loss,
    soft_target_cross_entropy,
    standardize_logits,
)
from slimforge.train.task import (
    CacheTeacher,
    LiveTeacher,
    StudentWithAdapters,
    build_task,
    task_names,
)
from tests.factories import tiny_bn_convnet, tiny_convnet


def batch(b: int = 6, n: int = 10, soft: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {
        "pixel_values": torch.randn(b, 1, 16, 16, generator=g),
        "label": torch.randint(0, n, (b,), generator=g),
        "index": torch.arange(b),
        "epoch": torch.zeros(b, dtype=torch.long),
    }
    if soft:
        target = F.one_hot(out["label"], n).float() * 0.7
        target[torch.arange(b), (out["label"] + 1) % n] += 0.3
        out["target"] = target
    return out


def models():
    torch.manual_seed(0)
    return tiny_convnet(10, 1), tiny_convnet(10, 1, width=16).eval().requires_grad_(False)


def test_the_registry_is_the_configs_choice():
    assert set(task_names()) == set(typing.get_args(typing.get_type_hints(LossConfig)["task"]))
    with pytest.raises(ConfigError, match="loss.task: 'fitnet' is not a task"):
        build_task(LossConfig(task="fitnet"), LiveTeacher(nn.Identity()))


def test_supervised_and_kd_tasks_give_the_documented_losses():
    student, teacher = models()
    x = batch()
    sup = build_task(LossConfig(label_smoothing=0.1), supervised=True)(student, x)
    assert torch.allclose(sup["loss"], F.cross_entropy(student(x["pixel_values"]), x["label"], label_smoothing=0.1))
    cfg = LossConfig(temperature=2.0, alpha=0.5)
    out = build_task(cfg, LiveTeacher(teacher))(student, x)
    ref = distillation_loss(student(x["pixel_values"]), teacher(x["pixel_values"]), x["label"], cfg)
    assert torch.allclose(out["loss"], ref["loss"]) and torch.allclose(out["kd"], ref["kd"])
    out["loss"].backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_standardised_and_decoupled_terms():
    student, teacher = models()
    x = batch()
    zs, zt = student(x["pixel_values"]), teacher(x["pixel_values"])
    std = build_task(LossConfig(temperature=2.0, standardize=True), LiveTeacher(teacher))(student, x)
    assert torch.allclose(std["kd"], kd_loss(standardize_logits(zs), standardize_logits(zt), 2.0))
    cfg = LossConfig(task="dkd", temperature=4.0, alpha=0.6, dkd_alpha=1.0, dkd_beta=2.0)
    out = build_task(cfg, LiveTeacher(teacher))(student, x)
    ref = dkd_loss(zs, zt, x["label"], 4.0, 1.0, 2.0)
    assert torch.allclose(out["dkd"], ref["dkd"]) and torch.allclose(out["tckd"], ref["tckd"])
    ce = F.cross_entropy(zs, x["label"])
    assert torch.allclose(out["loss"], 0.6 * ref["dkd"] + 0.4 * ce)


def test_soft_targets_from_mixing_replace_the_labels_in_the_cross_entropy():
    student, teacher = models()
    x = batch(soft=True)
    out = build_task(LossConfig(alpha=0.0, label_smoothing=0.1), LiveTeacher(teacher))(student, x)
    smoothed = x["target"] * 0.9 + 0.1 / 10
    assert torch.allclose(out["ce"], soft_target_cross_entropy(student(x["pixel_values"]), smoothed))


def hint_cfg(**kw) -> LossConfig:
    return LossConfig(task="hint", hints=[{"student": "3", "teacher": "2", "weight": 0.5}], **kw)


def test_hints_own_trainable_adapters_that_train_with_the_student_and_are_not_the_student():
    torch.manual_seed(0)
    student = tiny_bn_convnet(10, 1)  # layer "3" is a conv of 2 × 8 = 16 channels
    teacher = tiny_convnet(10, 1, width=16).eval().requires_grad_(False)  # layer "2" is a conv of 32 channels
    task = build_task(hint_cfg(), LiveTeacher(teacher))
    model = task.wrap_student(student, torch.zeros(2, 1, 16, 16))
    assert isinstance(model, StudentWithAdapters) and model.student is student
    proj = model.adapters["3"].proj[0]
    assert isinstance(proj, nn.Conv2d) and (proj.in_channels, proj.out_channels) == (16, 32)
    assert {k.split(".")[0] for k in model.state_dict()} == {"student", "adapters"}
    x = batch()
    out = task(model, x)
    assert set(out) >= {"loss", "kd", "ce", "hint_3"} and out["hint_3"] > 0
    kd_and_ce = 0.9 * out["kd"] + 0.1 * out["ce"]
    assert torch.allclose(out["loss"], kd_and_ce + 0.5 * out["hint_3"])
    out["loss"].backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    # The adapters never reach the logits: evaluation sees the student's own.
    logits, feats = model(x["pixel_values"])
    assert torch.equal(logits, student(x["pixel_values"])) and feats["3"].shape[1] == 32


def test_a_layer_that_does_not_exist_is_named_with_close_names():
    student, teacher = models()
    cfg = LossConfig(task="hint", hints=[{"student": "layer3", "teacher": "2"}])
    with pytest.raises(ConfigError, match=r"the student has no layer 'layer3'") as e:
        build_task(cfg, LiveTeacher(teacher)).wrap_student(student, torch.zeros(2, 1, 16, 16))
    assert "top level: 0, 1, 2, 3, 4, 5, 6" in e.value.fix
    import timm

    resnet = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    cfg = LossConfig(task="hint", hints=[{"student": "layer_3", "teacher": "2"}])
    with pytest.raises(ConfigError, match=r"no layer 'layer_3'; closest: layer3"):
        build_task(cfg, LiveTeacher(teacher)).wrap_student(resnet, torch.zeros(2, 1, 16, 16))


class _Cache:
    def __init__(self, k: int, n: int = 10) -> None:
        self.k, self.num_classes = k, n


def test_what_a_top_k_cache_cannot_serve_is_refused():
    topk = CacheTeacher(_Cache(k=3))
    with pytest.raises(ConfigError, match="dkd needs the teacher's logit of every class"):
        build_task(LossConfig(task="dkd"), topk)
    with pytest.raises(ConfigError, match="standardising needs all the teacher's logits"):
        build_task(LossConfig(standardize=True), topk)
    with pytest.raises(ConfigError, match="hint matches the teacher's intermediate features"):
        build_task(hint_cfg(), CacheTeacher(_Cache(k=10)))
    assert build_task(LossConfig(task="dkd"), CacheTeacher(_Cache(k=10))).teacher.complete


def test_hint_config_problems_are_named():
    assert LossConfig(hints=[{"student": "a", "teacher": "b"}]).validate() == [
        "hints: only task hint uses them (loss.task is 'kd'): set loss.task=hint or remove them"
    ]
    assert "hints[0]" in LossConfig(task="hint", hints=[{"student": "a"}]).validate()[0]
    negative = [{"student": "a", "teacher": "b", "weight": -1}]
    assert "hints[0].weight" in LossConfig(task="hint", hints=negative).validate()[0]
    with pytest.raises(ConfigError, match="task hint needs at least one"):
        build_task(LossConfig(task="hint"), LiveTeacher(nn.Identity()))
