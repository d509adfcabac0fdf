"""Input-pipeline and compute options for GPU runs, checked where they also act on the CPU: a bf16 or compiled
teacher gives the fp32 teacher's logits within its precision, channels_last keeps the numbers, the loader
options reach the DataLoader, and a run with all of them records what took effect."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from slimforge.train.checkpoint import load_checkpoint
from slimforge.train.config import load_config
from slimforge.train.data import build_loader, load_splits
from slimforge.train.placement import CastInputs, place_teacher
from slimforge.train.schema import RunConfig
from slimforge.train.task import freeze_
from tests.conftest import ROOT, run_cmd, tiny_data_config
from tests.factories import tiny_bn_convnet


def teacher_and_images():
    torch.manual_seed(0)
    teacher = freeze_(tiny_bn_convnet(10, 1, width=16))
    return teacher, torch.randn(8, 1, 32, 32)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_a_bf16_teacher_holds_bf16_weights_and_gives_the_fp32_logits_within_bf16_precision():
    teacher, images = teacher_and_images()
    with torch.no_grad():
        reference = teacher(images)
        low = place_teacher(teacher, "replicated", torch.device("cpu"), 1, dtype="bf16")
        got = low(images)
    assert isinstance(low, CastInputs) and {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert got.dtype == torch.bfloat16 and rel(got.float(), reference) < 3e-2
    assert (got.float().argmax(1) == reference.argmax(1)).float().mean() >= 0.75


def test_channels_last_teacher_keeps_its_logits():
    teacher, images = teacher_and_images()
    with torch.no_grad():
        reference = teacher(images)
        nhwc = place_teacher(teacher, "replicated", torch.device("cpu"), 1, channels_last=True)
        got = nhwc(images.contiguous(memory_format=torch.channels_last))
    conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and rel(got, reference) < 1e-5


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_a_compiled_teacher_gives_the_eager_logits():
    teacher, images = teacher_and_images()
    compiled = torch.compile(teacher)
    freeze_(compiled)  # what DistillationTask does to it
    with torch.no_grad():
        assert rel(compiled(images), teacher(images)) < 1e-5


def test_loader_options_reach_the_dataloader():
    data = tiny_data_config(num_workers=1, prefetch_factor=4, persistent_workers=True)
    loader = build_loader(load_splits(data).train, data, is_training=True, pin_memory=False)
    assert loader.prefetch_factor == 4 and loader.persistent_workers and not loader.pin_memory
    data = tiny_data_config(num_workers=0, prefetch_factor=None)
    loader = build_loader(load_splits(data).train, data, is_training=True)
    assert loader.prefetch_factor is None and not loader.persistent_workers


def test_a_sharded_teacher_is_not_compiled_and_says_so():
    with pytest.raises(Exception, match="compile_teacher: compiles a replicated teacher"):
        load_config(RunConfig, ROOT / "configs/debug/tiny_distill.yaml",
                    ["train.compile_teacher=true", "train.teacher_placement=sharded"])  # fmt: skip


def test_a_run_with_the_speed_options_records_them(tmp_path, teacher_ckpt):
    out = tmp_path / "run"
    overrides = [f"teacher.checkpoint={teacher_ckpt}", f"train.output_dir={out}", "train.epochs=1",
                 "train.channels_last=true", "train.teacher_dtype=bf16", "train.cudnn_benchmark=true",
                 "data.prefetch_factor=3", "data.max_train_samples=64", "train.tensorboard=false"]  # fmt: skip
    proc = run_cmd([sys.executable, "train/distill.py", "--config", "configs/debug/tiny_distill.yaml", *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    speed = summary["topology"]["speed"]
    assert speed["channels_last"] and speed["teacher_dtype"] == "bf16" and speed["prefetch_factor"] == 3
    assert speed["persistent_workers"] and not speed["pin_memory"]  # CPU: nothing to pin for
    teacher = load_checkpoint(teacher_ckpt)[0]
    assert summary["teacher_param_bytes_per_rank"] == [2 * sum(p.numel() for p in teacher.parameters())]  # bf16
    assert "speed options: loader_workers_per_rank 1" in proc.stderr
