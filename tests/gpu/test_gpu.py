"""The GPU tier: what only a CUDA machine can check. Runs with ``pytest -m gpu``; skipped with the reason elsewhere
(see tests/conftest.py). ``bash scripts/gpu_check.sh OUT`` covers the multi-minute paths (ZeRO, FSDP, resume, the
benchmark's GPU rows); these are the quick ones a GPU CI job runs on every change."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimforge.export.runtimes import get_runtime, runtime_class
from slimforge.export.to_onnx import export_onnx
from slimforge.export.to_torchscript import export_torchscript
from slimforge.export.verify import run_batches
from slimforge.train.checkpoint import load_checkpoint
from tests.conftest import launch_args, run_cmd, train_checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A trained resnet10t checkpoint, its ONNX export and 64 validation-sized images."""
    folder = tmp_path_factory.mktemp("gpu")
    ckpt = train_checkpoint(folder / "resnet10t", steps=40)
    model, spec, _ = load_checkpoint(ckpt)
    images = torch.randn(64, *spec.input_size, generator=torch.Generator().manual_seed(0))
    onnx_path = export_onnx(model.eval(), images[:2], folder / "model.onnx")
    with torch.no_grad():
        reference = model(images).numpy()
    return ckpt, onnx_path, images, reference


def logits(runtime: str, path, images, tf32: bool) -> tuple[np.ndarray, object]:
    rt = get_runtime(runtime)(tf32=tf32, max_batch=32)
    rt.load(path)
    return run_batches(rt, images, [32, 32]), rt


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("runtime", ["torch-eager-cuda", "ort-cuda", "torch-eager-cuda-cl"])
def test_gpu_runtimes_match_the_cpu_in_strict_fp32_and_say_when_tf32_is_on(student, runtime):
    ckpt, onnx_path, images, reference = student
    ok, why = runtime_class(runtime).available()
    if not ok:
        pytest.skip(why)  # e.g. an onnxruntime build without the CUDA provider
    path = onnx_path if runtime.startswith("ort") else ckpt
    strict, rt = logits(runtime, path, images, tf32=False)
    assert rt.precision == "fp32" and rel(strict, reference) < 1e-4
    fast, rt = logits(runtime, path, images, tf32=True)
    assert rt.precision == "tf32" and rt.details["tf32"] is True
    assert rel(fast, reference) < 1e-2 and (fast.argmax(1) == reference.argmax(1)).mean() >= 0.95


def test_a_torchscript_file_computes_in_the_precision_it_was_traced_with(student, tmp_path):
    ckpt, _, images, reference = student
    model, _, _ = load_checkpoint(ckpt)
    got, rt = logits("torchscript-cuda", export_torchscript(model.eval(), images[:2], tmp_path / "m.ts"), images, True)
    assert rt.precision == "fp32" and rt.details["tf32_requested"] is True and rel(got, reference) < 1e-4


def test_ort_cuda_keeps_copies_out_of_the_timed_call_and_names_its_node_placement(student):
    ok, why = runtime_class("ort-cuda").available()
    if not ok:
        pytest.skip(why)
    _, onnx_path, images, reference = student
    rt = get_runtime("ort-cuda")(tf32=False, max_batch=32)
    rt.load(onnx_path)
    binding, device_input = rt.prepare(images[:4].numpy())
    assert device_input.device_name().lower() == "cuda"
    out = rt.forward(binding)
    assert np.allclose(rt.to_numpy(out), reference[:4], rtol=0, atol=1e-4 * np.abs(reference).max())
    assert rt.details["nodes_per_provider"].get("CUDAExecutionProvider", 0) > 0


@pytest.mark.parametrize("runtime", ["torch-eager-cuda-bf16", "torch-eager-cuda-fp16", "ort-tensorrt"])
def test_reduced_precision_and_tensorrt_rows_agree_with_the_cpu(student, runtime):
    ckpt, onnx_path, images, reference = student
    ok, why = runtime_class(runtime).available()
    if not ok:
        pytest.skip(why)
    got, rt = logits(runtime, onnx_path if runtime.startswith("ort") else ckpt, images, tf32=False)
    assert (got.argmax(1) == reference.argmax(1)).mean() >= 0.9 and rel(got, reference) < 0.1
    if runtime == "ort-tensorrt":
        assert rt.details["tensorrt"]["trt_profile_max_shapes"].split(":")[1].startswith("32x")
        assert "fallback" not in rt.details, rt.details.get("fallback")


def test_a_one_gpu_ddp_distillation_runs_in_bf16(tmp_path):
    teacher = train_checkpoint(tmp_path / "teacher", steps=20)
    out = tmp_path / "run"
    overrides = [f"teacher.checkpoint={teacher}", "train.mixed_precision=bf16", "train.epochs=1"]
    args = launch_args("ddp.yaml", "train/distill.py", "configs/debug/tiny_distill.yaml", *overrides,
                       f"train.output_dir={out}")  # fmt: skip
    args[args.index("--config_file") + 2 : args.index("--config_file") + 2] = ["--num_processes", "1"]
    proc = run_cmd(args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_compute_dtype"] == "torch.bfloat16" and torch.cuda.is_available()
