"""Checkpoints and artifacts are data: an ONNX file's external data stays in its folder, a user-factory model is
rebuilt only when asked, and models whose class names differ from the evaluation data's are not compared."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimforge.export.benchmarking import BenchConfig, run_benchmark
from slimforge.export.description import KEY
from slimforge.export.external_data import check_external_data
from slimforge.export.measure import TimingConfig
from slimforge.export.runtimes import get_runtime, runtime_class
from slimforge.train.checkpoint import read_meta
from slimforge.train.errors import ExportError, ModelError
from tests.conftest import DIGITS, make_checkpoint

FAST = BenchConfig(
    timing=TimingConfig(batch_sizes=[1], runs=2, rounds=1, min_round_s=0, warmup=0, throughput_runs=1, threads=1),
    max_images=8,
    isolate=False,
    peak_seconds=0,
    progress=False,
)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("teacher") / "checkpoint")


def classifier_with_external_weights(path: Path, location: str, description: dict) -> None:
    """A [batch, 1, 32, 32] -> [batch, 10] ONNX classifier whose weight matrix is stored in file ``location``
    (relative to the model's folder, as the ONNX format says) and whose ``metadata_props`` carry ``description``."""
    w = np.random.default_rng(0).standard_normal((1024, 10)).astype(np.float32)
    weights = numpy_helper.from_array(w, "w")
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": str(w.nbytes)}.items():
        weights.external_data.add(key=key, value=value)
    target = Path(location) if os.path.isabs(location) else path.parent / location
    if not target.is_symlink():
        target.write_bytes(w.tobytes())
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "external",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.metadata_props.add(key=KEY, value=json.dumps(description))
    path.write_bytes(model.SerializeToString())


def test_external_data_inside_the_folder_loads(tmp_path, teacher):
    path = tmp_path / "model.onnx"
    classifier_with_external_weights(path, "model.onnx.data", read_meta(teacher))
    check_external_data(path)
    runtime = get_runtime("ort-cpu")(threads=1)
    runtime.load(path)
    assert runtime.run(np.ones((2, 1, 32, 32), np.float32)).shape == (2, 10)


@pytest.mark.parametrize("escape", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(tmp_path, teacher, escape):
    """slimforge refuses it itself, before a runtime opens the file; the runtimes at the versions pyproject.toml
    requires (onnxruntime >= 1.24.4, onnx >= 1.21) refuse it too."""
    secret = tmp_path / "outside.bin"
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "model.onnx"
    location = {"parent": "../outside.bin", "absolute": str(secret), "symlink": "weights.bin"}[escape]
    if escape == "symlink":
        secret.write_bytes(b"\0" * 40960)
        (tmp_path / "model" / "weights.bin").symlink_to(secret)
    classifier_with_external_weights(path, location, read_meta(teacher))
    assert secret.is_file()  # the file the model names exists and could be read

    with pytest.raises(ExportError) as info:
        check_external_data(path)
    assert info.value.problem.startswith(
        f"ONNX file {path} names external data outside its folder: tensor 'w' reads {location!r}, "
    )
    assert "keep every external-data file" in info.value.fix
    for name in ("ort-cpu", "openvino"):
        runtime = runtime_class(name)
        if runtime.available()[0]:  # openvino is an optional extra
            with pytest.raises(ExportError, match="names external data outside its folder"):
                runtime(threads=1).load(path)

    with pytest.raises(Exception, match="External data path"):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # the runtime's own refusal
    with pytest.raises(onnx.checker.ValidationError):
        onnx.load(str(path))


def test_the_benchmark_reports_an_escaping_onnx_as_an_error_row(tmp_path, teacher):
    (tmp_path / "model").mkdir()
    evil = tmp_path / "model" / "model.onnx"
    classifier_with_external_weights(evil, "../outside.bin", read_meta(teacher))
    report = run_benchmark(teacher, [f"{evil}@ort-cpu"], FAST)
    teacher_row, row = report["rows"]
    assert teacher_row["status"] == "ok"
    assert row["status"] == "error" and "names external data outside its folder" in row["reason"]
    assert "'../outside.bin'" in row["reason"] and row["accuracy"] is None


def test_the_benchmark_refuses_a_student_whose_class_names_differ(tmp_path, teacher):
    shuffled = [DIGITS[1], DIGITS[0], *DIGITS[2:]]
    student = make_checkpoint(tmp_path / "student", class_names=shuffled)
    with pytest.raises(ModelError) as info:
        run_benchmark(teacher, [str(student)], FAST)
    assert info.value.problem.splitlines()[0] == (
        f"student {student} names its classes differently from the evaluation data: position 0 is '1' in the "
        "student, '0' in the evaluation data (the same names in another order)"
    )
    assert "--data key=value" in info.value.fix


def test_the_benchmark_rebuilds_a_factory_model_only_when_allowed(tmp_path, teacher):
    student = make_checkpoint(tmp_path / "student", name="tests.factories:tiny_convnet", source="factory")
    settings = dataclasses.replace(FAST, runtimes=["torch-eager"])
    with pytest.raises(ModelError) as info:
        run_benchmark(teacher, [str(student)], settings)
    assert info.value.problem.startswith(f"student {student} was built by the user factory 'tests.factories:")
    assert info.value.fix == "if you trust that code, pass --allow-factory"

    allowed = dataclasses.replace(settings, allow_factory=True, isolate=True)  # the worker process opts in too
    rows = run_benchmark(teacher, [str(student)], allowed)["rows"]
    assert [(r["role"], r["status"]) for r in rows] == [("teacher", "ok"), ("student", "ok")]
    assert rows[1]["model"] == "tests.factories:tiny_convnet" and rows[1]["params"] > 0
