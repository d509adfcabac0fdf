"""The benchmark runner: every planned row measured or reported (skipped / error with a reason), numbers checked
independently, reports written (JSON, CSV, Markdown, HTML with an embedded PNG)."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from slimforge.compress.stats import count_macs, count_parameters
from slimforge.export.benchmark import main as benchmark_main
from slimforge.export.benchmarking import BenchConfig, run_benchmark, write_benchmark
from slimforge.export.benchmarking.plan import Target
from slimforge.export.benchmarking.rows import _METRICS, RowRunner
from slimforge.export.evaldata import ValidationSet
from slimforge.export.measure import TimingConfig
from slimforge.export.runtimes import runtime_class
from slimforge.train.checkpoint import load_checkpoint
from slimforge.train.data import DataConfig, load_splits, with_transform
from slimforge.train.sampling import stratified_indices

MNIST = DataConfig(source="embedded", name="mnist_5k", in_chans=1, image_size=32)  # as conftest's checkpoints
N = 48
SETTINGS = BenchConfig(
    timing=TimingConfig(batch_sizes=[1, 4], runs=6, rounds=3, min_round_s=0, warmup=1, throughput_runs=2, threads=1),
    max_images=N,
    isolate=False,
    peak_seconds=0.05,
    peak_size=256,
    progress=False,
    accuracy_budget=0.05,
)
PLANNED = {  # the default runtime set per artifact kind, in registry order
    "checkpoint": [
        "torch-eager",
        "torch-eager-bf16",
        "torch-eager-cl",
        "torch-eager-cuda",
        "torch-eager-cuda-bf16",
        "torch-eager-cuda-fp16",
        "torch-eager-cuda-cl",
    ],
    ".onnx": ["ort-cpu", "ort-cuda", "ort-tensorrt", "ort-tensorrt-fp16", "openvino"],
    ".ts": ["torchscript", "torchscript-cuda"],
}


def wrong_shape_onnx(path) -> None:
    """A valid ONNX classifier for [batch, 3, 16, 16] images (the benchmark will feed [1, 32, 32])."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "wrong_shape",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def setup(exported_student):
    """The exported student plus broken copies: truncated ONNX, damaged TorchScript, an ONNX of another shape."""
    out = exported_student.out
    (out / "broken.onnx").write_bytes((out / "model.onnx").read_bytes()[:5000])  # truncated
    shutil.copy(out / "model.ts", out / "broken.ts")
    with open(out / "broken.ts", "r+b") as f:  # zip archive with its central directory overwritten
        f.seek(-200, 2)
        f.write(b"\0" * 200)
    wrong_shape_onnx(out / "wrong_shape.onnx")
    return exported_student.teacher, exported_student.student, out


@pytest.fixture(scope="module")
def report(setup):
    teacher, student, out = setup
    students = [str(student), *(str(out / f) for f in ("model.onnx", "model.ts", "model.int8.onnx"))]
    students += [str(out / f) for f in ("broken.onnx", "broken.ts", "wrong_shape.onnx")]
    return run_benchmark(teacher, students, SETTINGS)


def _preds_ort(path, images: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": images[i : i + 32].numpy()})[0] for i in range(0, len(images), 32)])


def _rows(report, name: str) -> dict[str, dict]:
    return {r["runtime"]: r for r in report["rows"] if r["artifact"].endswith(name)}


def test_plan_covers_every_runtime_and_skips_with_reasons(report, setup):
    teacher, student, out = setup
    rows = report["rows"]
    got = [(r["artifact"], r["runtime"]) for r in rows]
    want = [(str(teacher), "torch-eager"), *((str(student), n) for n in PLANNED["checkpoint"])]
    for name in ("model.onnx", "model.ts", "model.int8.onnx", "broken.onnx", "broken.ts", "wrong_shape.onnx"):
        want += [(str(out / name), n) for n in PLANNED[name[name.rindex(".") :]]]
    assert got == want
    assert [r["role"] for r in rows] == ["teacher"] + ["student"] * (len(rows) - 1)
    for r in rows:
        assert set(_METRICS) | {"role", "model", "artifact", "runtime", "status", "reason", "fix"} <= set(r)
        ok, why = runtime_class(r["runtime"]).available()
        if not ok:  # never silently dropped: the row is there, with the runtime's own reason
            assert r["status"] == "skipped" and r["reason"] == why and why
            assert all(r[k] is None for k in _METRICS if k != "device")
            assert r["model"] == "mobilenetv3_small_050"  # named from model.json although not run
    if not torch.cuda.is_available():
        cuda_rows = [r for r in rows if r["runtime"] in ("torch-eager-cuda", "ort-cuda", "ort-tensorrt")]
        assert cuda_rows
        assert all(r["status"] == "skipped" and r["reason"] == "no CUDA GPU is visible" for r in cuda_rows)
    assert set(report["not_selected"]) == {"torch-compile", "torch-compile-cuda", "openvino-fp32", "ort-cpu-emulated"}


def test_errors_are_isolated_per_row(report, setup):
    _, _, out = setup
    for name, runtime, words in (
        ("broken.onnx", "ort-cpu", "cannot load ONNX artifact"),
        ("broken.onnx", "openvino", "cannot load artifact"),
        ("broken.ts", "torchscript", "cannot load TorchScript artifact"),
    ):
        r = _rows(report, name)[runtime]
        if runtime_class(runtime).available()[0]:
            assert r["status"] == "error" and words in r["reason"] and str(out / name) in r["reason"], r["reason"]
            assert r["fix"] and all(r[k] is None for k in _METRICS)
    for runtime in ("ort-cpu", "openvino"):
        r = _rows(report, "wrong_shape.onnx")[runtime]
        if runtime_class(runtime).available()[0]:
            assert r["status"] == "error"
            assert "takes input [?, 3, 16, 16]" in r["reason"] and "describes images [?, 1, 32, 32]" in r["reason"]
    # ... and the good rows after them completed.
    assert _rows(report, "model.int8.onnx")["ort-cpu"]["status"] == "ok"


def test_measured_numbers_match_an_independent_computation(report, setup):
    teacher, student, out = setup
    val = load_splits(MNIST).val
    val = val.select(stratified_indices(val["label"], N, MNIST.seed))  # the benchmark's documented sample
    images = torch.stack(with_transform(val, MNIST, is_training=False)[:N]["pixel_values"])
    labels = np.array(val["label"])
    t_model, t_spec, _ = load_checkpoint(teacher)
    s_model, s_spec, _ = load_checkpoint(student)
    with torch.no_grad():
        t_preds = t_model(images).argmax(1).numpy()
        s_preds = s_model(images).argmax(1).numpy()
    onnx_preds = _preds_ort(out / "model.onnx", images).argmax(1)
    t_row = report["rows"][0]
    ckpt, onnx_rows, ts = _rows(report, "student"), _rows(report, "model.onnx"), _rows(report, "model.ts")
    assert t_row["accuracy"] == pytest.approx((t_preds == labels).mean()) and t_row["agreement"] == 1.0
    assert ckpt["torch-eager"]["accuracy"] == pytest.approx((s_preds == labels).mean())
    assert ckpt["torch-eager"]["agreement"] == pytest.approx((s_preds == t_preds).mean())
    assert onnx_rows["ort-cpu"]["accuracy"] == pytest.approx((onnx_preds == labels).mean())
    assert onnx_rows["ort-cpu"]["agreement"] == pytest.approx((onnx_preds == t_preds).mean())
    assert ts["torchscript"]["accuracy"] == ckpt["torch-eager"]["accuracy"]  # parity-checked export

    ok = [r for r in report["rows"] if r["status"] == "ok"]
    assert len(ok) >= 6
    for r in ok:
        assert r["num_images"] == N and r["threads"] == 1 and 0 <= r["accuracy"] <= 1 and 0 <= r["agreement"] <= 1
        lat = r["latency_ms"]
        assert lat["runs"] == 6 and lat["rounds"] == len(lat["round_p50"]) == 3  # 2 calls per round
        assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] and lat["p50"] == pytest.approx(np.median(lat["round_p50"]))
        spread = (max(lat["round_p50"]) - min(lat["round_p50"])) / lat["p50"]
        assert lat["spread"] == pytest.approx(spread) and lat["stable"] == (spread <= 0.10)
        assert [s["batch_size"] for s in r["throughput"]] == [1, 4]
        assert all(s["images_per_s"] > 0 for s in r["throughput"])
        assert r["best_throughput"]["images_per_s"] == max(s["images_per_s"] for s in r["throughput"])
        assert r["speedup_p50"] == pytest.approx(t_row["latency_ms"]["p50"] / lat["p50"])
        assert r["memory"]["peak_rss_mb"] > 0 and r["load_seconds"] >= 0 and r["first_run_seconds"] > 0
        # Fraction of peak, recomputed from the report's own peak table.
        peak = report["peaks"]["cpu"][r["peak_precision"]]["ops_per_s"]
        achieved = 2 * r["macs"] * r["best_throughput"]["images_per_s"]
        assert r["achieved_ops_per_s"] == pytest.approx(achieved)
        assert r["fraction_of_peak"] == pytest.approx(achieved / peak)
    for r, model, spec in ((t_row, t_model, t_spec), (ckpt["torch-eager"], s_model, s_spec)):
        assert r["params"] == count_parameters(model) and r["macs"] == count_macs(model, spec.input_size)
    assert ckpt["torch-eager"]["size_bytes"] == (student / "model.safetensors").stat().st_size
    assert onnx_rows["ort-cpu"]["size_bytes"] == (out / "model.onnx").stat().st_size

    assert ckpt["torch-eager-bf16"]["precision"] == "bf16" and ckpt["torch-eager-bf16"]["peak_precision"] == "bf16"
    assert ckpt["torch-eager-cl"]["precision"] == "fp32"
    assert abs(ckpt["torch-eager-cl"]["accuracy"] - ckpt["torch-eager"]["accuracy"]) <= 2 / N  # fp32 near-ties
    int8 = _rows(report, "model.int8.onnx")["ort-cpu"]
    assert int8["compute_ops"]["int8"] > 0 and re.fullmatch(r"int8|mixed\(int8:\d+,fp32:\d+\)", int8["precision"])
    assert int8["peak_precision"] == "int8" and int8["size_bytes"] < onnx_rows["ort-cpu"]["size_bytes"]
    if runtime_class("openvino").available()[0]:
        ov = onnx_rows["openvino"]
        raw = ov["runtime_details"]["inference_precision_hint"]
        hint = {"f32": "fp32", "f16": "fp16"}.get(raw, raw)
        assert ov["status"] == "ok" and hint in ("bf16", "fp32", "fp16")
        assert ov["precision"] == hint or (ov["precision"].startswith("mixed(") and hint in ov["precision"])


def test_recommendation_and_pareto_flags(report):
    ok = [(i, r) for i, r in enumerate(report["rows"]) if r["status"] == "ok"]
    floor = report["rows"][0]["accuracy"] - SETTINGS.accuracy_budget
    fastest = min((r["latency_ms"]["p50"], i) for i, r in ok if r["accuracy"] >= floor - 1e-9)[1]
    rec = report["recommendation"]
    assert rec["row"] == fastest and rec["budget"] == SETTINGS.accuracy_budget
    assert rec["artifact"] == report["rows"][fastest]["artifact"]
    for i, r in ok:
        beaten = any(
            o["latency_ms"]["p50"] <= r["latency_ms"]["p50"]
            and o["accuracy"] >= r["accuracy"]
            and (o["latency_ms"]["p50"] < r["latency_ms"]["p50"] or o["accuracy"] > r["accuracy"])
            for j, o in ok
            if j != i
        )
        assert r["pareto"] is (not beaten)
    assert report["rows"][fastest]["pareto"]


def test_report_files(report, tmp_path):
    paths = write_benchmark(report, tmp_path / "bench")
    rows = report["rows"]
    saved = json.loads(paths["json"].read_text())
    assert [r["status"] for r in saved["rows"]] == [r["status"] for r in rows] and saved["peaks"]["cpu"]["fp32"]

    table = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(table) == len(rows)
    assert float(table[0]["p50_ms"]) == pytest.approx(rows[0]["latency_ms"]["p50"])
    assert table[0]["images_per_s_bs4"] and [t["status"] for t in table] == [r["status"] for r in rows]

    md = paths["md"].read_text()
    assert md.count("\n| ") == len(rows) + 1 and "Recommended (accuracy budget 0.05)" in md
    html = paths["html"].read_text()
    for r in rows:
        if r["status"] != "ok":
            assert f"- {r['artifact']} [{r['runtime']}]: {r['reason']}" in md
            assert r["reason"].replace("'", "&#x27;").replace('"', "&quot;") in html
    assert "Skipped:" in md and "Errors:" in md
    (b64,) = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    png = base64.b64decode(b64, validate=True)
    with Image.open(io.BytesIO(png)) as im:
        im.verify()
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 400
    assert "<script" not in html and "http://" not in html and "https://" not in html  # self-contained

    # A row whose rounds moved beyond unstable_spread is flagged in the table and named under it.
    moved = json.loads(json.dumps(report))
    i = next(i for i, r in enumerate(moved["rows"]) if r["status"] == "ok" and r["role"] != "teacher")
    moved["rows"][i]["latency_ms"].update(spread=0.31, stable=False)
    for r in moved["rows"][:i] + moved["rows"][i + 1 :]:
        if r.get("latency_ms"):
            r["latency_ms"].update(spread=0.01, stable=True)
    md = write_benchmark(moved, tmp_path / "moved")["md"].read_text()
    assert md.count(" ⚠ |") == 1 and "31.0% ⚠" in md
    assert f"Unstable (⚠, round medians more than 10% apart): {rows[i]['artifact']} [{rows[i]['runtime']}] 31%" in md


def test_isolated_rows_measure_their_own_memory(setup, report):
    teacher, _, out = setup
    cfg = dataclasses.replace(SETTINGS, isolate=True, peak_seconds=0)
    iso = run_benchmark(teacher, [f"{out / 'model.onnx'}@ort-cpu"], cfg)
    t_row, row = iso["rows"]
    assert row["status"] == "ok" and iso["peaks"] is None and row["fraction_of_peak"] is None
    for r in (t_row, row):
        mem = r["memory"]
        assert mem["method"].startswith("VmHWM reset") and mem["rss_increase_mb"] > 0
        assert mem["rss_before_mb"] > 50  # a fresh process that already holds torch and the images
    # The same predictions as in this process: accuracy and agreement agree with the in-process report.
    same = _rows(report, "model.onnx")["ort-cpu"]
    assert (row["accuracy"], row["agreement"]) == (same["accuracy"], same["agreement"])

    runner = RowRunner(dataclasses.replace(cfg, row_timeout=0.2), ValidationSet(MNIST, 8))
    try:
        slow, preds = runner.measure(Target(out / "model.onnx", "ort-cpu", "student"), None)
    finally:
        runner.close()
    assert slow["status"] == "error" and "took longer than 0.2 s" in slow["reason"] and preds is None


def test_benchmark_entry(setup, tmp_path, capsys):
    teacher, _, out = setup
    argv = ["--teacher", str(teacher), "--student", str(out / "model.onnx"), str(tmp_path / "missing.onnx")]
    argv += ["--out", str(tmp_path / "bench"), "--runs", "3", "--min-round-s", "0", "--warmup", "1"]
    argv += ["--throughput-runs", "1"]
    argv += ["--batch-sizes", "1", "2", "--max-images", "8", "--threads", "1", "--runtimes", "ort-cpu"]
    argv += ["--no-isolate", "--peak-seconds", "0", "--no-progress", "--note", "random init"]
    assert benchmark_main(argv) == 0
    stdout = capsys.readouterr().out
    assert "| mobilenetv3_small_050 (student) | ort-cpu | fp32 |" in stdout and "does not exist" in stdout
    assert stdout.startswith("**random init**")
    report = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert [r["status"] for r in report["rows"]] == ["ok", "ok", "error"]
    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == [
        "benchmark.csv",
        "benchmark.html",
        "benchmark.json",
        "benchmark.md",
    ]

    argv[1] = str(tmp_path / "no_teacher")
    assert benchmark_main(argv) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint")
    assert benchmark_main([*argv[2:], "--teacher", str(teacher), "--accuracy-budget", "2"]) == 2
    assert "accuracy_budget: 2.0 must be in [0, 1]" in capsys.readouterr().err


def test_an_artifact_copied_alone_benchmarks_with_its_own_description(exported_student, tmp_path):
    """No model.json, no checkpoint beside it: the .onnx and .ts carry their model description (input size,
    normalisation, classes, dataset) and score exactly what the checkpoint scores on the same images."""
    lone = tmp_path / "elsewhere"
    lone.mkdir()
    for name in ("model.onnx", "model.ts"):
        shutil.copy(exported_student.out / name, lone / name)
    assert sorted(p.name for p in lone.iterdir()) == ["model.onnx", "model.ts"]
    students = [
        f"{exported_student.student}@torch-eager",
        f"{lone / 'model.onnx'}@ort-cpu",
        f"{lone / 'model.ts'}@torchscript",
    ]
    rows = run_benchmark(exported_student.teacher, students, SETTINGS)["rows"][1:]
    assert [r["status"] for r in rows] == ["ok"] * 3, [r["reason"] for r in rows]
    eager = rows[0]
    for r in rows[1:]:
        assert r["model"] == "mobilenetv3_small_050" and r["num_images"] == eager["num_images"] == N
        assert r["accuracy"] == eager["accuracy"]
        assert r["params"] == eager["params"] and r["macs"] == eager["macs"]


def test_an_artifact_without_a_description_is_refused_by_name(exported_student, tmp_path):
    wrong_shape_onnx(tmp_path / "bare.onnx")  # written by hand: no metadata_props, no model.json
    row = run_benchmark(exported_student.teacher, [f"{tmp_path / 'bare.onnx'}@ort-cpu"], SETTINGS)["rows"][1]
    assert row["status"] == "error" and "carries no model description" in row["reason"] and "model.json" in row["fix"]
