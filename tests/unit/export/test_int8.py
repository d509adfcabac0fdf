"""The onnx-int8 export format: a QDQ graph, per-channel weights, integer kernels in ORT, judged on agreement."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from slimforge.export.artifacts import ExportConfig, export_checkpoint, failure_message
from slimforge.export.evaldata import ValidationSet
from slimforge.export.runtimes import get_runtime
from slimforge.export.verify import ParityConfig, compare_logits
from slimforge.train.checkpoint import load_checkpoint
from slimforge.train.data import DataConfig

MNIST = DataConfig(source="embedded", name="mnist_5k", in_chans=1, image_size=32)
N = 64


@pytest.fixture(scope="module")
def int8_export(module_checkpoint_factory, tmp_path_factory):
    ckpt = module_checkpoint_factory("resnet10t")
    out = tmp_path_factory.mktemp("int8")
    # Random init: logits are near-tied (margins ~1e-5), so only a low agreement can be asked for here.
    cfg = ExportConfig(formats=["onnx-int8"], max_images=N, calibration_images=48, int8_parity=ParityConfig(None, 0.5))
    return ckpt, out, export_checkpoint(ckpt, out, cfg)


def test_int8_graph_is_qdq_with_per_channel_weights(int8_export):
    _, out, report = int8_export
    (entry,) = report["artifacts"]
    assert report["passed"] and entry["file"] == "model.int8.onnx" and entry["precision"] == "int8"
    assert entry["calibration_images"] == 48 and entry["int8_activations"] == "uint8"
    graph = onnx.load(str(out / "model.int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 10 and ops.count("DequantizeLinear") >= 20
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 14  # resnet10t
    for conv in convs:
        # Every convolution reads its weights through a DequantizeLinear of int8 values with one scale per channel.
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8
        scales = numpy_helper.to_array(inits[dq.input[1]])
        assert scales.shape == (inits[dq.input[0]].dims[0],)
        # ... and its input through a uint8 Q/DQ pair.
        assert producers[conv.input[0]].op_type == "DequantizeLinear"


def test_ort_runs_int8_kernels_and_agreement_is_reported(int8_export, tmp_path):
    ckpt, out, report = int8_export
    model, spec, _ = load_checkpoint(ckpt)
    images = ValidationSet(MNIST, N).images_for(spec)
    with torch.no_grad():
        ref = model(images).numpy()
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(out / "model.int8.onnx"), so, providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {"input": images[i : i + 16].numpy()})[0] for i in range(0, N, 16)])
    parity = report["artifacts"][0]["parity"]
    assert parity["top1_agreement"] == pytest.approx((got.argmax(1) == ref.argmax(1)).mean())
    assert parity["rtol"] is None and parity["min_agreement"] == 0.5
    # Int8 is not FP32: the logits differ far beyond the FP32 formats' 1e-4, yet track the reference.
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert 1e-4 < rel < 0.5 and parity["rel_diff"] == pytest.approx(rel, rel=1e-3)

    optimized = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    rt = get_runtime("ort-cpu")(threads=1)
    rt.load(out / "model.int8.onnx")
    # U8S8 Q/DQ: ORT turns all 14 convolutions and the classifier into integer kernels.
    assert optimized.count("QLinearConv") == 14 and "Conv" not in optimized
    assert rt.compute_ops == {"int8": 15, "fp32": 0} and rt.precision == "int8"


def test_int8_parity_judges_agreement_only():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 5))
    noisy = ref + rng.normal(scale=0.05, size=ref.shape)  # far beyond 1e-4, same top-1 where margins allow
    agreement = float((noisy.argmax(1) == ref.argmax(1)).mean())
    assert not compare_logits(ref, noisy, ParityConfig(), "a", "rt", [20]).passed
    assert compare_logits(ref, noisy, ParityConfig(rtol=None, min_agreement=agreement), "a", "rt", [20]).passed
    bad = compare_logits(ref, noisy[::-1], ParityConfig(rtol=None, min_agreement=0.9), "a.int8", "rt", [20])
    assert not bad.passed and bad.rtol is None
    message = failure_message(
        {"artifacts": [{"format": "onnx-int8", "status": "failed", "file": "x.failed", "parity": bad.to_dict()}]}
    )
    assert "not checked" in message and "top-1 agreement" in message
    assert "int8_parity.rtol" in " ".join(ExportConfig(int8_parity=ParityConfig(rtol=-1.0)).validate())
    assert ExportConfig(int8_activations="int4").validate()


def test_calibration_images_come_from_the_training_split(int8_export):
    ckpt, _, _ = int8_export
    spec = load_checkpoint(ckpt)[1]
    val, train = ValidationSet(MNIST, 8), ValidationSet(MNIST, 8, split="train")
    assert len(train) == 8 and not torch.equal(train.images_for(spec), val.images_for(spec))
