"""Model factory: timm, torchvision and user factories; clear errors for names and sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimforge.train.errors import ModelError
from slimforge.train.models import ModelConfig, build_model, resolve_num_classes


def tiny_factory(num_classes: int, in_chans: int, width: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)
    )


@pytest.mark.parametrize(
    "cfg, input_size",
    [
        (ModelConfig(source="timm", name="resnet10t"), (1, 32, 32)),
        (
            ModelConfig(source="timm", name="vit_tiny_patch16_224", kwargs={"img_size": 32, "patch_size": 8}),
            (3, 32, 32),
        ),
        (ModelConfig(source="torchvision", name="mobilenet_v3_small"), (3, 32, 32)),
        (
            ModelConfig(source="factory", name="tests.unit.train.test_models:tiny_factory", kwargs={"width": 8}),
            (1, 16, 16),
        ),
    ],
    ids=["timm", "timm-vit", "torchvision", "factory"],
)
def test_builds_from_every_source(cfg, input_size):
    model, spec = build_model(cfg, 7, input_size, {"mean": [0.5] * input_size[0], "std": [0.5] * input_size[0]})
    assert model.training  # returned ready to train
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, *input_size)).shape == (2, 7)
    assert spec.num_classes == 7 and spec.input_size == list(input_size) and spec.kwargs == cfg.kwargs


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(ModelError) as info:
        build_model(ModelConfig(name="resnet181"), 10, (3, 32, 32))
    assert "timm has no model named 'resnet181'" in info.value.problem
    assert "resnet18" in info.value.fix


def test_unknown_torchvision_name_suggests_close_names():
    with pytest.raises(ModelError) as info:
        build_model(ModelConfig(source="torchvision", name="mobilenet_v3_smal"), 10, (3, 32, 32))
    assert "mobilenet_v3_small" in info.value.fix


def test_image_size_the_model_cannot_take():
    with pytest.raises(ModelError) as info:
        build_model(ModelConfig(name="vit_tiny_patch16_224"), 10, (3, 32, 32))
    assert "cannot take input [3, 32, 32]" in info.value.problem and "224" in info.value.problem
    assert "img_size" in info.value.fix


def test_torchvision_needs_three_channels():
    with pytest.raises(ModelError, match="3-channel"):
        build_model(ModelConfig(source="torchvision", name="resnet18"), 10, (1, 32, 32))


def test_num_classes_must_match_the_dataset():
    assert resolve_num_classes(ModelConfig(name="r"), 10, "model") == 10
    with pytest.raises(ModelError, match="teacher.num_classes is 100 but the dataset has 10 classes"):
        resolve_num_classes(ModelConfig(name="r", num_classes=100), 10, "teacher")


def test_bad_factory_is_reported():
    with pytest.raises(ModelError, match="cannot import model factory"):
        build_model(ModelConfig(source="factory", name="tests.nowhere:fn"), 10, (1, 8, 8))


def test_class_names_in_another_order_are_refused_at_the_first_difference():
    from slimforge.train.models import check_class_names

    check_class_names(["cat", "dog"], ["cat", "dog"], "teacher checkpoint t", ("teacher", "dataset"), "fix")
    check_class_names([], ["cat", "dog"], "teacher checkpoint t", ("teacher", "dataset"), "fix")  # not recorded
    with pytest.raises(ModelError) as info:
        check_class_names(["cat", "dog", "eel"], ["cat", "eel", "dog"], "teacher t", ("teacher", "dataset"), "fx")
    assert info.value.problem.splitlines() == [
        "teacher t names its classes differently from the dataset: position 1 is 'dog' in the teacher, 'eel' in the "
        "dataset (the same names in another order)",
        "  teacher: ['cat', 'dog', 'eel']",
        "  dataset: ['cat', 'eel', 'dog']",
    ]
    assert info.value.fix == "fx"
    with pytest.raises(ModelError, match="position 0 is 'a' in the student, 'x' in the data\n"):
        check_class_names(["a", "b"], ["x", "b"], "student s", ("student", "data"), "fx")


def test_a_description_with_an_unknown_field_or_source_is_refused_by_name():
    from slimforge.train.models import ModelSpec

    good = {"source": "timm", "name": "resnet10t", "num_classes": 10, "input_size": [1, 32, 32]}
    assert ModelSpec.from_dict(good).name == "resnet10t"
    with pytest.raises(ModelError, match="unknown field 'colour'; unknown model source 'keras'"):
        ModelSpec.from_dict({**good, "colour": "red", "source": "keras"})
    with pytest.raises(ModelError, match="missing field 'num_classes'"):
        ModelSpec.from_dict({k: v for k, v in good.items() if k != "num_classes"})
