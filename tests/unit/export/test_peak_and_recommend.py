"""Report arithmetic: matmul peak timing, fraction of peak, precision → peak, Pareto front, recommendation."""

from __future__ import annotations

import time

import pytest

from slimforge.export.benchmarking.analysis import finish_rows, pareto_front, recommend
from slimforge.export.peak import _rate, fraction_of_peak, measure_peaks, peak_key
from slimforge.export.runtimes import runtime_class


def test_rate_is_the_best_stretch_of_a_known_cost(monkeypatch):
    """A clock that only the kernel advances: 10 ms per call, one "operation" each, is 100 ops/s, and a stretch
    slowed by other work (one call of 60 ms) does not lower the best."""
    clock = {"now": 0.0, "calls": 0}

    def kernel():
        clock["calls"] += 1
        clock["now"] += 0.06 if clock["calls"] == 7 else 0.01

    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    assert _rate(kernel, ops=1.0, seconds=0.25) == pytest.approx(100.0)


def test_measure_peaks_small():
    peaks = measure_peaks(threads=1, seconds=0.02, cpu_size=128)
    cpu = peaks["cpu"]
    assert set(cpu) == {"fp32", "bf16", "int8"} and peaks["cpu_size"] == 128
    for key in ("fp32", "int8"):
        assert cpu[key]["ops_per_s"] > 1e8 and cpu[key]["best"] in cpu[key]["kernels"]
        measured = [v for v in cpu[key]["kernels"].values() if isinstance(v, float)]
        assert cpu[key]["ops_per_s"] == max(measured)
    openvino = {"openvino MatMul"} if runtime_class("openvino").available()[0] else set()
    assert set(cpu["fp32"]["kernels"]) == {"torch.mm", "onnxruntime MatMul"} | openvino
    assert cpu["bf16"]["ops_per_s"] or cpu["bf16"]["skipped"]


def test_fraction_of_peak_arithmetic():
    assert fraction_of_peak(1_000_000, 500.0, 4e9) == (1e9, 0.25)  # 2 * 1e6 MACs * 500 img/s = 1e9 ops/s
    assert fraction_of_peak(1_000_000, 500.0, None) == (1e9, None)
    assert fraction_of_peak(None, 500.0, 4e9) == (None, None) and fraction_of_peak(10, None, 4e9) == (None, None)


@pytest.mark.parametrize(
    "precision,ops,key",
    [
        ("fp32", None, "fp32"),
        ("bf16", None, "bf16"),
        ("int8", {"int8": 15, "fp32": 0}, "int8"),
        ("mixed(int8:10,fp32:4)", {"int8": 10, "fp32": 4}, "int8"),
        ("mixed(int8:4,fp32:10)", {"int8": 4, "fp32": 10}, "fp32"),  # mostly FP32 kernels: judged as FP32
        ("mixed(bf16,fp32)", None, "bf16"),  # no counts: the fastest precision, never a flattering one
        ("unknown", None, None),
        (None, None, None),
    ],
)
def test_peak_key(precision, ops, key):
    assert peak_key(precision, ops) == key


def _row(name, p50, acc, role="student", status="ok", size=100, precision="fp32", macs=1000, ips=None):
    return {
        "role": role,
        "artifact": name,
        "runtime": "rt",
        "model": name,
        "status": status,
        "precision": precision if status == "ok" else None,
        "compute_ops": None,
        "device": "cpu",
        "latency_ms": {"p50": p50} if status == "ok" else None,
        "accuracy": acc if status == "ok" else None,
        "size_bytes": size,
        "macs": macs,
        "best_throughput": {"images_per_s": ips or 1000.0 / p50, "batch_size": 1} if status == "ok" else None,
    }


def test_pareto_front():
    # (latency, accuracy): b is dominated by a (slower, less accurate); c trades speed for accuracy; d equals a.
    pts = [(1.0, 0.90), (2.0, 0.85), (3.0, 0.95), (1.0, 0.90), (0.5, 0.50)]
    assert pareto_front(pts) == [True, False, True, True, True]


def test_recommend_fastest_within_budget():
    rows = [
        _row("teacher", 10.0, 0.95, role="teacher"),
        _row("fast_bad", 1.0, 0.90),  # 5 points below: outside a 1-point budget
        _row("ok_slow", 4.0, 0.945),
        _row("ok_fast", 3.0, 0.94),  # exactly 1 point below: inside (the floor is inclusive)
        _row("ok_fast_small", 3.0, 0.941, size=50),  # same p50: the smaller artifact wins
        _row("broken", 0.1, None, status="error"),
    ]
    rec = recommend(rows, 0.01)
    assert rec["artifact"] == "ok_fast_small" and rec["row"] == 4 and rec["candidates"] == 4
    assert rec["accuracy_floor"] == pytest.approx(0.94)
    assert recommend(rows, 0.05)["artifact"] == "fast_bad"
    assert recommend(rows, 0.0)["artifact"] == "teacher"  # nothing matches the teacher: the teacher itself
    assert recommend([_row("t", 1.0, None, role="teacher", status="error")], 0.01) is None


def test_finish_rows_fills_speedup_peak_fraction_and_pareto():
    rows = [
        _row("teacher", 10.0, 0.95, role="teacher", macs=2000),
        _row("int8", 2.0, 0.94, precision="int8", macs=1000),
        _row("skipped", 0, 0, status="skipped"),
    ]
    peaks = {"cpu": {"fp32": {"ops_per_s": 4e5}, "int8": {"ops_per_s": 1e6}}}
    finish_rows(rows, peaks)
    teacher, int8, skipped = rows
    assert teacher["speedup_p50"] == 1.0 and int8["speedup_p50"] == pytest.approx(5.0)
    # teacher: 2 * 2000 MACs * 100 img/s = 4e5 ops/s = 100% of the fp32 peak; int8: 2 * 1000 * 500 = 1e6 = 100%.
    assert teacher["fraction_of_peak"] == pytest.approx(1.0) and teacher["peak_precision"] == "fp32"
    assert int8["achieved_ops_per_s"] == pytest.approx(1e6) and int8["fraction_of_peak"] == pytest.approx(1.0)
    assert int8["peak_precision"] == "int8" and int8["peak_ops_per_s"] == 1e6
    assert teacher["pareto"] and int8["pareto"] and skipped.get("speedup_p50") is None and skipped.get("pareto") is None
    finish_rows(rows, None)
    assert int8["fraction_of_peak"] is None and int8["achieved_ops_per_s"] == pytest.approx(1e6)


def test_gpu_rows_are_compared_with_the_gpu_teacher_and_recommended_per_device():
    def on(device, row):
        row["device"] = device
        row["runtime"] = "torch-eager-cuda" if device == "cuda" and row["role"] == "teacher" else row["runtime"]
        return row

    rows = [
        on("cpu", _row("teacher", 10.0, 0.90, role="teacher")),
        on("cuda", _row("teacher", 1.0, 0.90, role="teacher")),
        on("cpu", _row("cpu_student", 2.0, 0.895)),
        on("cuda", _row("gpu_student", 0.25, 0.895)),
        on("cuda", _row("gpu_slow", 2.5, 0.90)),
    ]
    peaks = {"cpu": {"fp32": {"ops_per_s": 1e9}}, "cuda": {"fp32": {"ops_per_s": 1e12}}}
    finish_rows(rows, peaks)
    assert rows[2]["speedup_p50"] == pytest.approx(5.0) and rows[2]["speedup_vs"] == "rt (cpu)"
    assert rows[3]["speedup_p50"] == pytest.approx(4.0) and rows[3]["speedup_vs"] == "torch-eager-cuda (cuda)"
    assert rows[1]["speedup_p50"] == pytest.approx(1.0)
    # One front per device: the 0.25 ms GPU row does not push the CPU student off the CPU front.
    assert rows[2]["pareto"] and rows[3]["pareto"] and not rows[4]["pareto"]
    cpu, cuda = recommend(rows, 0.01), recommend(rows, 0.01, "cuda")
    assert (cpu["row"], cpu["device"]) == (2, "cpu") and (cuda["row"], cuda["device"]) == (3, "cuda")
    assert recommend(rows, 0.01, "xpu") is None
