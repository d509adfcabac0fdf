"""Int8 exports on a trained model: QDQ graphs ORT runs in integer kernels, both gates, the MAC gate, and the format
following the checkpoint's recipe."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from slimforge.compress.quantize.fakequant import quantizers
from slimforge.compress.stats import count_macs
from slimforge.export.artifacts import ExportConfig, Int8Config, export_checkpoint, failure_message
from slimforge.export.evaldata import ValidationSet, data_config_from_meta
from slimforge.export.export import main as export_main
from slimforge.export.onnx_graph import int8_macs
from slimforge.train.checkpoint import load_checkpoint
from slimforge.train.errors import ConfigError
from tests.conftest import compress_checkpoint

N = 96


@pytest.fixture(scope="module")
def ptq_export(trained_resnet, tmp_path_factory):
    out = tmp_path_factory.mktemp("ptq")
    cfg = ExportConfig(formats=["onnx-int8", "onnx-int8-ort"], max_images=N, int8=Int8Config(calibration_images=64))
    return out, export_checkpoint(trained_resnet, out, cfg)


@pytest.fixture(scope="module")
def qat_checkpoint(trained_resnet, tmp_path_factory):
    steps = [{"method": "qat", "calibration_images": 64, "freeze_observers_step": 3, "freeze_bn_step": 4}]
    return compress_checkpoint(trained_resnet, tmp_path_factory.mktemp("qat") / "ckpt", steps)[0]


def test_ptq_graph_is_qdq_with_int8_weights_and_int32_biases(ptq_export):
    out, report = ptq_export
    entry = report["artifacts"][0]
    assert report["passed"] and entry["file"] == "model.int8.onnx" and entry["precision"] == "int8"
    assert entry["calibrator"] == "minmax" and entry["calibration_images"] == 64
    graph = onnx.load(str(out / "model.int8.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 14  # resnet10t
    for conv in convs:
        weight_dq, bias_dq = producers[conv.input[1]], producers[conv.input[2]]
        assert inits[weight_dq.input[0]].data_type == onnx.TensorProto.INT8
        assert numpy_helper.to_array(inits[weight_dq.input[1]]).shape == (inits[weight_dq.input[0]].dims[0],)
        assert inits[bias_dq.input[0]].data_type == onnx.TensorProto.INT32
        assert producers[conv.input[0]].op_type == "DequantizeLinear"  # a uint8 Q/DQ pair in front


def test_every_mac_runs_in_an_integer_kernel_counted_independently(ptq_export, trained_resnet):
    out, report = ptq_export
    entry = report["artifacts"][0]
    model, spec, _ = load_checkpoint(trained_resnet)
    macs = int8_macs(out / "model.int8.onnx", [1, *spec.input_size])
    # The MACs ORT's graph carries are the model's own, as torch's FLOP counter counts them.
    assert macs["total_macs"] == count_macs(model, spec.input_size)
    assert macs["fraction"] == entry["int8_mac_fraction"] == 1.0 and not macs["float_layers"]
    assert macs["ops"] == {"QLinearConv": 14, "QGemm": 1}


def test_both_gates_compare_with_the_fake_quant_model(ptq_export):
    _, report = ptq_export
    checks = report["artifacts"][0]["checks"]
    assert set(checks) == {"emulated", "deployed"}
    assert checks["emulated"]["runtime"] == "ort-cpu-emulated" and checks["deployed"]["runtime"] == "ort-cpu"
    assert checks["emulated"]["rel_diff"] <= 1e-2 and checks["emulated"]["top1_agreement"] >= 0.99
    assert checks["deployed"]["top1_agreement"] >= 0.99
    ort_static = report["artifacts"][1]
    assert ort_static["format"] == "onnx-int8-ort" and ort_static["passed"]
    assert set(ort_static["checks"]) == {"deployed"}


def test_qat_checkpoint_exports_its_learned_scales_by_default(qat_checkpoint, tmp_path):
    report = export_checkpoint(qat_checkpoint, tmp_path, ExportConfig(max_images=N))
    assert [a["format"] for a in report["artifacts"]] == ["onnx-qdq", "torchscript"] and report["passed"]
    assert report["recipe"] == ["qat"]
    qdq, ts = report["artifacts"]
    assert qdq["int8_mac_fraction"] == 1.0 and ts["checks"]["parity"]["rel_diff"] <= 1e-4
    model, spec, _ = load_checkpoint(qat_checkpoint)
    learned = sorted({round(float(q.scale), 9) for q in quantizers(model)})
    graph = onnx.load(str(tmp_path / "model.int8.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    exported = sorted({round(float(inits[n.input[1]]), 9) for n in graph.node if n.op_type == "QuantizeLinear"})
    assert exported == learned  # never re-calibrated
    images = ValidationSet(data_config_from_meta(json.loads((tmp_path / "model.json").read_text())), N)
    x = images.images_for(spec)
    sess = ort.InferenceSession(str(tmp_path / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {"input": x[i : i + 32].numpy()})[0] for i in range(0, N, 32)])
    with torch.no_grad():
        ref = model(x).numpy()
    assert (got.argmax(1) == ref.argmax(1)).mean() == qdq["checks"]["deployed"]["top1_agreement"]


def test_a_quantized_checkpoint_refuses_a_float_format_by_name(qat_checkpoint, trained_resnet, tmp_path):
    with pytest.raises(ConfigError) as e:
        export_checkpoint(qat_checkpoint, tmp_path / "a", ExportConfig(formats=["onnx"]))
    assert "is quantised" in e.value.problems[0] and "onnx-qdq" in e.value.problems[0]
    with pytest.raises(ConfigError) as e:
        export_checkpoint(trained_resnet, tmp_path / "b", ExportConfig(formats=["onnx-qdq"]))
    assert "is a float model" in e.value.problems[0] and "onnx-int8" in e.value.problems[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_float_layers_fail_the_int8_gate_and_leave_no_final_file(trained_resnet, tmp_path):
    ckpt, _ = compress_checkpoint(trained_resnet, tmp_path / "ckpt", [{"method": "ptq", "skip": ["layer4.*"]}], 0)
    report = export_checkpoint(ckpt, tmp_path / "out", ExportConfig(formats=["onnx-qdq"], max_images=32))
    (entry,) = report["artifacts"]
    assert not report["passed"] and entry["status"] == "failed" and entry["file"] == "model.int8.onnx.failed"
    assert entry["int8_mac_fraction"] < 0.95 and all(c["passed"] for c in entry["checks"].values())
    assert not (tmp_path / "out" / "model.int8.onnx").exists()
    message = failure_message(report)
    assert "FAILED the int8 gate" in message and "minimum 95%" in message and "layer4" in message


def test_export_entry_refuses_zero_calibration_images(trained_resnet, tmp_path, capsys):
    code = export_main(["--checkpoint", str(trained_resnet), "--out", str(tmp_path / "o"), "--formats", "onnx-int8",
                        "--calibration-images", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "int8.calibration_images: 0 must be >= 1" in err and not (tmp_path / "o").exists()


def test_dynamic_quantization_for_linear_heavy_models(module_checkpoint_factory, tmp_path):
    vit = module_checkpoint_factory("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4})
    loose = Int8Config(versus_float=Int8Config().versus_float.__class__(rtol=None, min_agreement=0.5))
    report = export_checkpoint(vit, tmp_path, ExportConfig(formats=["onnx-dynamic"], max_images=32, int8=loose))
    (entry,) = report["artifacts"]
    assert entry["status"] == "passed" and entry["precision"].startswith(("int8", "mixed(int8"))
    assert 0.5 < entry["int8_mac_fraction"] <= 1.0  # the attention's activation x activation matmuls stay float


def test_a_tensorrt_targeted_file_is_checked_in_tensorrt_or_refused_by_name(trained_resnet, tmp_path):
    from slimforge.export.runtimes import runtime_class

    if runtime_class("ort-tensorrt").available()[0]:
        pytest.skip("TensorRT is available here: the deployed check runs in it")
    ckpt, _ = compress_checkpoint(trained_resnet, tmp_path / "ckpt", [{"method": "ptq", "backend": "tensorrt"}], 0)
    assert load_checkpoint(ckpt)[1].recipe[-1]["record"]["activations"] == "int8"  # symmetric, as TensorRT takes
    report = export_checkpoint(ckpt, tmp_path / "out", ExportConfig(formats=["onnx-qdq"], max_images=32))
    (entry,) = report["artifacts"]
    assert entry["status"] == "error" and "targets TensorRT" in entry["error"] and "backend: ort-cpu" in entry["fix"]
    assert not list((tmp_path / "out").glob("model.int8.onnx*"))
