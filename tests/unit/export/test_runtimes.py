"""Runtimes beyond ONNX Runtime and TorchScript: OpenVINO, bf16 autocast, channels_last, torch.compile; the run
plan; the input-shape check."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from slimforge.export.benchmarking.plan import plan_rows, selected_runtimes
from slimforge.export.evaldata import ValidationSet
from slimforge.export.machine import cpu_has_bf16
from slimforge.export.measure import check_input_shape
from slimforge.export.runtimes import available_runtimes, get_runtime, runtime_class
from slimforge.train.checkpoint import load_checkpoint
from slimforge.train.data import DataConfig
from slimforge.train.errors import ExportError

MNIST = DataConfig(source="embedded", name="mnist_5k", in_chans=1, image_size=32)
needs_openvino = pytest.mark.skipif(not runtime_class("openvino").available()[0], reason="openvino not installed")


@pytest.fixture(scope="module")
def images_and_reference(exported_student):
    model, spec, _ = load_checkpoint(exported_student.student)
    images = ValidationSet(MNIST, 16).images_for(spec)
    with torch.no_grad():
        return images.numpy(), model(images).numpy()


def _rel(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(ref.astype(np.float64) - got).max() / np.abs(ref).max())


@needs_openvino
def test_openvino_runs_the_onnx_and_reports_its_precision(exported_student, images_and_reference):
    import openvino as ov

    images, ref = images_and_reference
    onnx_path = exported_student.out / "model.onnx"
    fp32 = get_runtime("openvino-fp32")(threads=1)
    fp32.load(onnx_path)
    assert fp32.precision == "fp32" and fp32.details["inference_precision_hint"] == "f32"
    assert _rel(ref, fp32.run(images)) < 1e-4 and fp32.input_shape() == [None, 1, 32, 32]

    default = get_runtime("openvino")(threads=1)
    default.load(onnx_path)
    # Independently of the runtime class: what OpenVINO itself picks for this CPU.
    compiled = ov.Core().compile_model(str(onnx_path), "CPU")
    hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    assert default.details["inference_precision_hint"] == hint
    assert hint == ("bf16" if cpu_has_bf16() else "f32")
    assert sum(default.compute_ops.values()) >= 10
    if hint == "bf16":
        assert default.precision == "bf16" and default.compute_ops.get("bf16", 0) > 0
        assert 1e-5 < _rel(ref, default.run(images)) < 0.1  # bf16 really ran: not FP32-exact, still close


def test_eager_variants_compute_what_they_say(exported_student, images_and_reference):
    images, ref = images_and_reference
    bf16 = get_runtime("torch-eager-bf16")(threads=1)
    bf16.load(exported_student.student)
    got = bf16.run(images)
    assert bf16.precision == "bf16" and got.dtype == np.float32 and 1e-5 < _rel(ref, got) < 0.1
    # The teacher (resnet10t) has 3x3 convolutions over many channels, where NHWC and NCHW layouts differ.
    teacher, _, _ = load_checkpoint(exported_student.teacher)
    with torch.no_grad():
        t_ref = teacher(torch.from_numpy(images)).numpy()
    cl = get_runtime("torch-eager-cl")(threads=1)
    cl.load(exported_student.teacher)
    convs = [p for p in cl.module.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    assert cl.precision == "fp32" and _rel(t_ref, cl.run(images)) < 1e-5


@pytest.mark.slow
def test_torch_compile_matches_eager(exported_student, images_and_reference):
    images, ref = images_and_reference
    if not runtime_class("torch-compile").available()[0]:
        pytest.skip(runtime_class("torch-compile").available()[1])
    rt = get_runtime("torch-compile")(threads=2)
    rt.load(exported_student.student)
    assert _rel(ref, rt.run(images)) < 1e-4  # one shape: each further one is another ~15 s compile on 2 cores


def test_selection_and_plan(exported_student, tmp_path):
    default = selected_runtimes(["default"])
    assert "torch-compile" not in default and "openvino-fp32" not in default and "ort-cpu" in default
    assert selected_runtimes(["all"]) == available_runtimes()
    assert selected_runtimes(["ort-cpu", "torch-compile"]) == ["ort-cpu", "torch-compile"]

    student, onnx_path = exported_student.student, exported_student.out / "model.onnx"
    plan = plan_rows([str(student), f"{onnx_path}@openvino-fp32", str(tmp_path / "gone.onnx")], ["ort-cpu"])
    assert [(t.path, t.runtime, t.skip is not None) for t in plan] == [
        (student, None, True),  # no selected runtime runs a checkpoint: one skipped row that says which would
        (onnx_path, "openvino-fp32", False),  # PATH@RUNTIME: exactly that runtime, selected or not
        (tmp_path / "gone.onnx", None, False),  # missing: one row, which reports the error
    ]
    assert "torch-eager" in plan[0].skip and "--runtimes" in plan[0].skip
    plan = plan_rows([str(onnx_path)], ["default", "openvino-fp32"])
    assert [t.runtime for t in plan] == [
        "ort-cpu",
        "ort-cuda",
        "ort-tensorrt",
        "ort-tensorrt-fp16",
        "openvino",
        "openvino-fp32",
    ]


def test_input_shape_check():
    check_input_shape(None, (4, 1, 32, 32), "a")
    check_input_shape([None, 1, 32, 32], (4, 1, 32, 32), "a")
    check_input_shape([None, None, None, None], (4, 1, 32, 32), "a")
    with pytest.raises(ExportError, match=r"takes input \[\?, 3, 32, 32\].*describes images \[\?, 1, 32, 32\]"):
        check_input_shape([None, 3, 32, 32], (4, 1, 32, 32), "a.onnx")
    with pytest.raises(ExportError, match=r"takes input \[\?, 1024\]"):
        check_input_shape([None, 1024], (4, 1, 32, 32), "a.onnx")
    with pytest.raises(ExportError, match="batch axis fixed at 1") as e:
        check_input_shape([1, 1, 32, 32], (4, 1, 32, 32), "a.onnx")
    assert "dynamic batch axis" in e.value.fix


def test_gpu_runtimes_say_why_they_cannot_run():
    for name in ("torch-eager-cuda", "torchscript-cuda", "ort-cuda", "ort-tensorrt"):
        ok, why = runtime_class(name).available()
        assert ok or why, name
        if not torch.cuda.is_available():
            assert (ok, why) == (False, "no CUDA GPU is visible")
    if not torch.cuda.is_available():
        with pytest.raises(ExportError, match="not available here: no CUDA GPU is visible"):
            get_runtime("ort-cuda")
    for name in available_runtimes():
        assert runtime_class(name).summary() and runtime_class(name).kinds, name


def test_node_placement_reads_back_which_provider_ran_each_node(exported_student, tmp_path):
    """The reader the GPU providers use to name nodes that fell back, on a CPU session's own profile."""
    import onnxruntime as ort

    from slimforge.export.runtimes.ort import node_placement, session_options

    so = session_options(1)
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "profile")
    path = exported_student.out / "model.onnx"
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 1, 32, 32), np.float32)})
    placement = node_placement(sess.end_profiling())
    graph_ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert set(placement) == {"CPUExecutionProvider"}
    assert placement["CPUExecutionProvider"].get("Conv", 0) > 0 or placement["CPUExecutionProvider"].get("FusedConv")
    assert sum(placement["CPUExecutionProvider"].values()) >= 1 and graph_ops
    assert node_placement(str(tmp_path / "missing.json")) == {}


@pytest.mark.parametrize(
    "name",
    ["torch-eager-cuda-bf16", "torch-eager-cuda-fp16", "torch-eager-cuda-cl", "torch-compile-cuda",
     "ort-tensorrt-fp16"],
)  # fmt: skip
def test_gpu_runtimes_say_why_they_cannot_run_here(name):
    cls = runtime_class(name)
    ok, why = cls.available()
    assert cls.device == "cuda"
    if not torch.cuda.is_available():
        assert not ok and why


def test_torchscript_files_are_traced_in_strict_fp32_and_say_so(tmp_path):
    """A traced convolution keeps cuDNN's TF32 switch as a graph constant that no runtime flag reaches (on a GPU,
    PyTorch's default True made a TorchScript file differ from eager FP32 by 2.4e-4): export traces with it off
    and restores the process's setting; the runtime reads the constant back."""
    from slimforge.export.runtimes.pytorch import traced_tf32
    from slimforge.export.to_torchscript import export_torchscript

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        path = export_torchscript(model, torch.randn(2, 3, 8, 8), tmp_path / "m.ts")
        assert torch.backends.cudnn.allow_tf32 is True
        assert traced_tf32(torch.jit.load(str(path))) is False
        assert traced_tf32(torch.jit.freeze(torch.jit.trace(model, torch.randn(2, 3, 8, 8)))) is True
    finally:
        torch.backends.cudnn.allow_tf32 = before
