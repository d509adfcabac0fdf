"""Export parity: ONNX Runtime and TorchScript artifacts give the PyTorch model's logits on real MNIST images."""

from __future__ import annotations

import json
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from slimforge.export.artifacts import MODEL_JSON, REPORT, ExportConfig, export_checkpoint
from slimforge.export.export import main as export_main
from slimforge.export.runtimes import get_runtime
from slimforge.export.verify import ParityConfig, batch_plan, check_parity, compare_logits, reference_logits
from slimforge.train.checkpoint import load_checkpoint
from slimforge.train.data import DataConfig, load_splits, with_transform

MNIST = DataConfig(source="embedded", name="mnist_5k", in_chans=1, image_size=32)  # as conftest's checkpoints
MAX_IMAGES = 96  # 1 + 32 + 32 + 31: three batch sizes through the dynamic axis

ARCHS = [
    pytest.param("resnet10t", {}, id="resnet"),
    pytest.param("mobilenetv3_small_050", {}, id="mobilenet"),
    pytest.param("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, id="vit"),
]


def mnist_val_images(n: int) -> torch.Tensor:
    """The first ``n`` validation images ``[n, 1, 32, 32]``, loaded straight through train.data."""
    val = with_transform(load_splits(MNIST).val.select(range(n)), MNIST, is_training=False)
    return torch.stack(val[:n]["pixel_values"])


def relative_diff(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.abs(reference.astype(np.float64) - candidate).max() / np.abs(reference).max())


@pytest.mark.parametrize("name,kwargs", ARCHS)
def test_exported_artifacts_match_pytorch(checkpoint_factory, tmp_path, name, kwargs):
    ckpt = checkpoint_factory(name, kwargs)
    out = tmp_path / "export"
    report = export_checkpoint(ckpt, out, ExportConfig(max_images=MAX_IMAGES))

    assert report["passed"], report["artifacts"]
    assert report["num_images"] == MAX_IMAGES
    assert {a["format"]: a["file"] for a in report["artifacts"]} == {"onnx": "model.onnx", "torchscript": "model.ts"}
    for a in report["artifacts"]:
        p = a["parity"]
        assert p["rel_diff"] <= 1e-4 and p["top1_agreement"] == 1.0 and p["num_images"] == MAX_IMAGES
        assert p["max_abs_diff"] == pytest.approx(p["rel_diff"] * p["logit_scale"])
        assert len(p["batch_sizes"]) >= 3  # 1, full and partial batches
    saved = json.loads((out / REPORT).read_text())
    assert saved["passed"] and json.loads((out / MODEL_JSON).read_text())["model"]["name"] == name
    assert sorted(f.name for f in out.iterdir()) == sorted([MODEL_JSON, REPORT, "model.onnx", "model.ts"])

    # Independent of export.verify: plain ORT / torch.jit on images from train.data, at a batch of 5 (the
    # exporter saw a batch of 2), against the model rebuilt from the checkpoint.
    model, _, _ = load_checkpoint(ckpt)
    images = mnist_val_images(37)
    with torch.no_grad():
        ref = model(images).numpy()

    proto = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert proto.opset_import[0].version >= 17
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for lo, hi in ((0, 5), (5, 37)):
        got = sess.run(["logits"], {"input": images[lo:hi].numpy()})[0]
        assert relative_diff(ref[lo:hi], got) <= 1e-4
        assert (got.argmax(1) == ref[lo:hi].argmax(1)).all()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
        scripted = torch.jit.load(str(out / "model.ts"))
    with torch.no_grad():
        got = scripted(images).numpy()
    assert relative_diff(ref, got) <= 1e-4 and (got.argmax(1) == ref.argmax(1)).all()


def _perturb_classifier_bias(src: Path, dst: Path, delta: float) -> None:
    """Adds ``delta`` to the first class's bias of the last layer (the 1-D initializer of length 10)."""
    proto = onnx.load(str(src))
    bias = [t for t in proto.graph.initializer if list(t.dims) == [10]]
    assert bias, "the exported graph should hold the classifier bias"
    values = numpy_helper.to_array(bias[-1]).copy()
    values[0] += delta
    bias[-1].CopyFrom(numpy_helper.from_array(values, bias[-1].name))
    onnx.save(proto, str(dst))


def test_verify_detects_a_perturbed_onnx_graph(checkpoint_factory, tmp_path):
    ckpt = checkpoint_factory("resnet10t")
    report = export_checkpoint(ckpt, tmp_path / "ok", ExportConfig(formats=["onnx"], max_images=64))
    assert report["passed"]
    model, _, _ = load_checkpoint(ckpt)
    images = mnist_val_images(64)
    plan = batch_plan(len(images), 32)
    reference = reference_logits(model, images, plan)
    scale = float(np.abs(reference).max())

    results = {}
    for delta in (1e-2 * scale, 10 * scale):  # a small numeric drift, and one that changes predictions
        bad = tmp_path / f"bad_{delta:.0e}.onnx"
        _perturb_classifier_bias(tmp_path / "ok" / "model.onnx", bad, delta)
        runtime = get_runtime("ort-cpu")(threads=1)
        runtime.load(bad)  # real ONNX Runtime, no mocking
        results[delta] = check_parity(runtime, images, reference, plan, ParityConfig(), str(bad))

    small, large = results.values()
    assert not small.passed and small.rel_diff == pytest.approx(1e-2, rel=1e-3)
    assert small.top1_agreement > 0.0
    assert not large.passed and large.top1_agreement < 1.0 and large.rel_diff > 1.0


def test_compare_logits_flags_disagreement_and_non_finite_outputs():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(8, 5)).astype(np.float32)
    cfg = ParityConfig()
    assert compare_logits(ref, ref.copy(), cfg, "same", "rt", [8]).passed

    swapped = ref.copy()
    top = ref[0].argmax()
    swapped[0, top] = ref[0].min() - 1  # first image's top-1 changes
    r = compare_logits(ref, swapped, ParityConfig(rtol=1e9), "swapped", "rt", [8])
    assert not r.passed and r.top1_agreement == pytest.approx(7 / 8)

    nan = ref.copy()
    nan[3, 2] = np.nan
    r = compare_logits(ref, nan, ParityConfig(rtol=1e9, min_agreement=0.0), "nan", "rt", [8])
    assert not r.passed and r.rel_diff == float("inf")


@pytest.mark.parametrize("damage", ["truncated", "bit_flip", "missing_json"])
def test_export_entry_rejects_a_broken_checkpoint(checkpoint_factory, tmp_path, capsys, damage):
    ckpt = checkpoint_factory("resnet10t")
    weights = ckpt / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "bit_flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (ckpt / "slimforge.json").unlink()
    out = tmp_path / "export"

    assert export_main(["--checkpoint", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "\n  fix: " in err
    assert {"truncated": "truncated", "bit_flip": "SHA-256", "missing_json": "slimforge.json"}[damage] in err
    assert not out.exists()  # nothing written, so nothing can look like an artifact


def test_export_entry_rejects_bad_options(checkpoint_factory, tmp_path, capsys):
    ckpt = checkpoint_factory("resnet10t")
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--opset", "16"]) == 2
    assert "opset: 16 must be >= 17" in capsys.readouterr().err


BRANCHY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Branchy(nn.Module):
        # Python control flow on the batch size: a trace at batch 2 keeps only the small-batch branch.
        def __init__(self, num_classes, in_chans):
            super().__init__()
            self.conv = nn.Conv2d(in_chans, 8, 3)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            logits = self.fc(self.conv(x).mean((2, 3)))
            if x.shape[0] > 4:
                return logits.flip(-1)
            return logits


    def make(num_classes, in_chans):
        return Branchy(num_classes, in_chans)
    """
)


def test_export_entry_fails_when_the_trace_does_not_generalise(checkpoint_factory, tmp_path, monkeypatch, capsys):
    (tmp_path / "branchy_model.py").write_text(BRANCHY)
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = checkpoint_factory("branchy_model:make", source="factory")
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.ts").write_bytes(b"stale artifact of an earlier run")

    argv = ["--checkpoint", str(ckpt), "--out", str(out), "--formats", "torchscript", "--max-images", "40"]
    assert export_main(argv) == 2  # a factory checkpoint is code: refused without the opt-in
    assert "user factory 'branchy_model:make'" in capsys.readouterr().err
    assert export_main([*argv, "--allow-factory"]) == 1
    err = capsys.readouterr().err
    assert "torchscript artifact FAILED its parity check (kept as model.ts.failed)" in err and "top-1 agreement" in err
    assert not (out / "model.ts").exists() and (out / "model.ts.failed").is_file()
    report = json.loads((out / REPORT).read_text())
    (artifact,) = report["artifacts"]
    assert not report["passed"] and artifact["status"] == "failed" and artifact["parity"]["top1_agreement"] < 1.0


def test_export_script_runs_as_a_file(tmp_path):
    # `python export/export.py` puts export/ first on sys.path; the entry must still import the `export` package.
    from tests.conftest import ROOT, run_cmd

    env = {"PYTHONPATH": str(ROOT)}  # harmless once the package is installed editable
    proc = run_cmd([sys.executable, "export/export.py", "--checkpoint", str(tmp_path / "nope"), "--out", "x"], env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: checkpoint") and "does not exist" in proc.stderr
