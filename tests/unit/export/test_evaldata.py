"""Each model is evaluated through its own preprocessing: a timm model's ``pretrained_cfg`` (as timm's ``validate.py``
feeds it) where the config leaves the fields null, recorded in the checkpoint and read back by export and benchmark;
the config's values and the data's defaults otherwise (the embedded 32-px MNIST configs keep their transform)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from slimforge.export.evaldata import ValidationSet, data_config_from_meta
from slimforge.train.checkpoint import spec_from_meta
from slimforge.train.data import DataConfig, build_transform, describe
from slimforge.train.engine.evaluate import data_for_model
from slimforge.train.models import ModelConfig, ModelSpec

# Five different pretrained_cfgs: crop_pct 0.95 / 0.875 / 0.9, mean ImageNet / 0.5, all bicubic at 224 px.
MODELS = ["resnet50.a1_in1k", "convnext_atto", "efficientnet_b0", "vit_tiny_patch16_224"]
MODELS += ["deit_tiny_distilled_patch16_224"]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 500×375 RGB image (seeded noise: any difference in resizing or cropping shows) as a one-class image folder."""
    root = tmp_path_factory.mktemp("photo")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    for split in ("train", "validation"):
        (root / split / "a").mkdir(parents=True)
        image.save(root / split / "a" / "photo.png")  # lossless: both sides decode the same pixels
    return root


@pytest.mark.parametrize("name", MODELS)
def test_the_eval_tensor_is_timms_for_the_models_own_pretrained_cfg(name, photo):
    data = DataConfig(source="imagefolder", path=str(photo), in_chans=3)  # preprocessing left to the model
    # What a run with `model: {name: ..., pretrained: true}` feeds it (resolved without downloading the weights) ...
    resolved = data_for_model(data, ModelConfig(name=name, pretrained=True))
    info = describe(resolved)
    spec = ModelSpec(source="timm", name=name, num_classes=1, input_size=info["input_size"], class_names=["a"])
    spec = dataclasses.replace(spec, **{k: info[k] for k in ("mean", "std", "interpolation", "crop_pct", "crop_mode")})
    # ... recorded in a checkpoint's JSON and read back the way export and benchmark read it.
    meta = json.loads(json.dumps({"model": spec.to_dict(), "extra": {"data": dataclasses.asdict(resolved)}}))
    got = ValidationSet(data_config_from_meta(meta)).images_for(spec_from_meta(meta, name))[0]

    with torch.device("meta"):  # a pretrained_cfg does not depend on the weights: skip initialising them (seconds)
        model = timm.create_model(name, pretrained=False)
    reference = create_transform(**resolve_data_config({}, model=model))
    with Image.open(photo / "validation" / "a" / "photo.png") as image:
        want = reference(image.convert("RGB"))
        data_default = build_transform(dataclasses.replace(data, image_size=224), is_training=False)(image)
    assert torch.equal(got, want)
    assert not torch.equal(data_default, want)  # what it was evaluated with before: the whole image, bilinear


def test_a_config_value_wins_and_a_model_without_its_own_keeps_the_datas_defaults():
    mnist = DataConfig(source="embedded", name="mnist_5k", in_chans=1, image_size=32)
    # A randomly initialised model has no preprocessing of its own: the embedded configs' transform is unchanged.
    plain = data_for_model(mnist, ModelConfig(name="resnet10t"))
    assert (plain.image_size, plain.interpolation, plain.crop_pct, plain.crop_mode) == (32, "bilinear", 1.0, "center")
    assert (plain.mean, plain.std) == ([0.1307], [0.3081])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))  # as MNIST's
    before = create_transform(
        input_size=(1, 32, 32), mean=(0.1307,), std=(0.3081,), interpolation="bilinear", is_training=False, crop_pct=1.0
    )
    assert torch.equal(build_transform(plain, is_training=False)(image), before(image))

    # Pretrained weights bring their own where the config says nothing; an RGB normalisation does not fit 1 channel.
    own = data_for_model(mnist, ModelConfig(name="resnet10t", pretrained=True))
    assert (own.image_size, own.interpolation, own.crop_pct) == (32, "bicubic", 0.875)
    assert (own.mean, own.std) == ([0.1307], [0.3081])
    rgb = data_for_model(DataConfig(in_chans=3, crop_pct=1.0), ModelConfig(name="resnet10t", pretrained=True))
    assert (rgb.image_size, rgb.crop_pct, rgb.mean) == (176, 1.0, [0.485, 0.456, 0.406])
