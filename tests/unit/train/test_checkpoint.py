"""Checkpoints: self-describing round trip, and every broken form rejected with a clear error."""

from __future__ import annotations

import json
import os

import pytest
import torch

from slimforge.train.checkpoint import META, WEIGHTS, load_checkpoint, read_spec, save_checkpoint
from slimforge.train.errors import CheckpointError
from tests.conftest import make_checkpoint


def test_round_trip_rebuilds_the_same_model_without_the_config(tmp_path):
    path = make_checkpoint(tmp_path / "ckpt", name="resnet10t", seed=3)
    model, spec, meta = load_checkpoint(path)
    assert spec.name == "resnet10t" and spec.num_classes == 10 and spec.input_size == [1, 32, 32]
    assert spec.mean == [0.1307] and meta["extra"]["data"]["name"] == "mnist_5k"
    torch.manual_seed(3)
    x = torch.randn(2, 1, 32, 32)
    again, _, _ = load_checkpoint(path)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x))
    assert not model.training
    assert sorted(p.name for p in path.iterdir()) == [WEIGHTS, META]


def test_truncated_weights_are_rejected(tmp_path):
    path = make_checkpoint(tmp_path / "ckpt")
    weights = path / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_checkpoint(path)
    assert info.value.fix


def test_corrupted_weights_fail_the_checksum(tmp_path):
    path = make_checkpoint(tmp_path / "ckpt")
    weights = path / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # same size, one flipped byte inside a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["no_meta", "bad_json", "not_ours", "no_weights", "missing_dir"])
def test_incomplete_checkpoints_are_rejected(tmp_path, damage):
    path = make_checkpoint(tmp_path / "ckpt")
    if damage == "no_meta":
        (path / META).unlink()
    elif damage == "bad_json":
        (path / META).write_text('{"format": "slimforge.checkp')
    elif damage == "not_ours":
        (path / META).write_text(json.dumps({"hello": 1}))
    elif damage == "no_weights":
        (path / WEIGHTS).unlink()
    else:
        path = tmp_path / "elsewhere"
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    a = make_checkpoint(tmp_path / "a", name="resnet10t")
    b = make_checkpoint(tmp_path / "b", name="resnet18")
    os.replace(b / WEIGHTS, a / WEIGHTS)
    meta = json.loads((a / META).read_text())
    meta["weights"]["bytes"] = (a / WEIGHTS).stat().st_size
    import hashlib

    meta["weights"]["sha256"] = hashlib.sha256((a / WEIGHTS).read_bytes()).hexdigest()
    (a / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(a)


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path / "ckpt", seed=1)
    before = (path / WEIGHTS).read_bytes()
    spec = read_spec(path)
    import safetensors.torch

    def crash(*args, **kwargs):
        raise OSError("disk full")  # injected failure while the new weights are being written

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint({"w": torch.zeros(1)}, spec, path)
    assert (path / WEIGHTS).read_bytes() == before
    load_checkpoint(path)  # still complete and valid


def test_a_crash_mid_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import safetensors.torch

    from slimforge.train.models import ModelSpec

    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    target = tmp_path / "new"
    with pytest.raises(OSError):
        save_checkpoint({"w": torch.zeros(1)}, ModelSpec("timm", "resnet10t", 10, [1, 32, 32]), target)
    assert not target.exists()


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m["model"].update(colour="red"), "unknown field 'colour'"),
        (lambda m: m["model"].update(source="keras"), "unknown model source 'keras' (slimforge builds timm, "),
        (lambda m: m["model"].pop("input_size"), "missing field 'input_size'"),
        (lambda m: m["weights"].update(file="../other/model.safetensors"), "names weights file '../other/"),
    ],
    ids=["unknown_field", "unknown_source", "missing_field", "weights_outside"],
)
def test_a_description_this_slimforge_cannot_read_is_refused_by_name(tmp_path, edit, needle):
    path = make_checkpoint(tmp_path / "ckpt")
    meta = json.loads((path / META).read_text())
    edit(meta)
    (path / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert info.value.problem.startswith(f"checkpoint {path}") and needle in info.value.problem
    assert info.value.fix


SENTINEL_FACTORY = """
import pathlib
from torch import nn

pathlib.Path(__file__).with_suffix(".imported").open("a").write("x")  # counts every import of this module


def make(num_classes, in_chans):
    return nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
"""


def test_a_factory_checkpoint_runs_its_code_only_when_allowed(tmp_path, monkeypatch):
    """A checkpoint is data: one whose architecture is a user factory is refused before its module is imported,
    and loads when the caller opts in."""
    import sys

    module = tmp_path / "sentinel_factory.py"
    module.write_text(SENTINEL_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = make_checkpoint(tmp_path / "ckpt", name="sentinel_factory:make", source="factory")
    imports = tmp_path / "sentinel_factory.imported"
    assert imports.read_text() == "x"  # building it imported the factory once
    monkeypatch.delitem(sys.modules, "sentinel_factory")

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, opt_in="pass --allow-factory")
    assert info.value.problem == (
        f"checkpoint {path} was built by the user factory 'sentinel_factory:make': rebuilding it imports and runs "
        "that Python code, which slimforge does only when asked to"
    )
    assert info.value.fix == "if you trust that code, pass --allow-factory"
    assert imports.read_text() == "x" and "sentinel_factory" not in sys.modules  # refused before any import

    model, spec, _ = load_checkpoint(path, allow_factory=True)
    assert spec.source == "factory" and imports.read_text() == "xx"
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


def test_a_factory_teacher_loads_only_with_its_allow_factory_key(tmp_path):
    from slimforge.train.data import describe
    from slimforge.train.models import ModelConfig
    from slimforge.train.models.load import load_or_build
    from tests.conftest import DIGITS, tiny_data_config

    path = make_checkpoint(tmp_path / "ckpt", name="tests.factories:tiny_convnet", source="factory")
    info = describe(tiny_data_config())
    shape = (10, info["input_size"], info, DIGITS)
    with pytest.raises(CheckpointError) as refused:
        load_or_build(ModelConfig(checkpoint=str(path)), "teacher", *shape)
    assert "user factory 'tests.factories:tiny_convnet'" in refused.value.problem
    assert refused.value.fix == "if you trust that code, set teacher.allow_factory=true"
    model, spec = load_or_build(ModelConfig(checkpoint=str(path), allow_factory=True), "teacher", *shape)
    assert spec.name == "tests.factories:tiny_convnet" and spec.class_names == DIGITS
