"""Shared fixtures: small randomly initialised checkpoints that record the real embedded MNIST-5k dataset."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slimforge.export.artifacts import ExportConfig, Int8Config, export_checkpoint
from slimforge.export.verify import ParityConfig
from slimforge.train.checkpoint import save_checkpoint
from slimforge.train.data import DataConfig, describe
from slimforge.train.models import ModelConfig, build_model

MNIST = DataConfig(source="embedded", name="mnist_5k", in_chans=1, image_size=32)


def _make_checkpoint(
    path: Path, name: str, kwargs: dict | None = None, seed: int = 0, source: str = "timm", data: DataConfig = MNIST
) -> Path:
    """A checkpoint of ``name`` (random init from ``seed``) for 10 classes at [1, 32, 32] trained 'on' ``data``."""
    torch.manual_seed(seed)
    model, spec = build_model(
        ModelConfig(source=source, name=name, kwargs=dict(kwargs or {})),
        10,
        (data.in_chans, data.image_size, data.image_size),
        describe(data),
        [str(i) for i in range(10)],
    )
    return save_checkpoint(model.state_dict(), spec, path, extra={"data": asdict(data)})


def _factory(root: Path):
    def make(name: str, kwargs: dict | None = None, seed: int = 0, source: str = "timm") -> Path:
        return _make_checkpoint(root / f"ckpt_{name.replace(':', '_')}_{seed}", name, kwargs, seed, source)

    return make


@pytest.fixture
def checkpoint_factory(tmp_path: Path):
    """``make(name, kwargs=None, seed=0, source="timm") -> checkpoint dir`` under this test's tmp_path."""
    return _factory(tmp_path)


@pytest.fixture(scope="module")
def module_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory):
    """As ``checkpoint_factory``, for module-scoped fixtures that several tests read (and never modify)."""
    return _factory(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def exported_student(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A resnet10t teacher, a mobilenetv3_small_050 student and its verified ONNX, TorchScript and int8 exports.

    Random init has near-tied logits, so int8 parity is checked at a low agreement here; test_int8 checks the
    int8 numbers themselves.
    """
    root = tmp_path_factory.mktemp("exported_student")
    teacher = _make_checkpoint(root / "teacher", "resnet10t", seed=0)
    student = _make_checkpoint(root / "student", "mobilenetv3_small_050", seed=1)
    out = root / "export"
    loose = ParityConfig(rtol=None, min_agreement=0.5)
    int8 = Int8Config(calibration_images=32, emulated=loose, deployed=loose)
    cfg = ExportConfig(formats=["onnx", "torchscript", "onnx-int8"], max_images=33, int8=int8)
    report = export_checkpoint(student, out, cfg)
    assert report["passed"], report["artifacts"]
    return SimpleNamespace(teacher=teacher, student=student, out=out, report=report)
