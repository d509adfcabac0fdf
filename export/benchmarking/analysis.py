"""Numbers across rows: speedup over the teacher, fraction of peak, the Pareto front and the recommendation."""

from __future__ import annotations

from typing import Any

from slimforge.export.peak import fraction_of_peak, peak_key


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which ``(latency, accuracy)`` points no other point beats: as fast or faster *and* as accurate or more,
    better in at least one."""
    front = []
    for i, (lat, acc) in enumerate(points):
        dominated = any(
            (lo <= lat and ao >= acc) and (lo < lat or ao > acc) for j, (lo, ao) in enumerate(points) if j != i
        )
        front.append(not dominated)
    return front


def teacher_for(rows: list[dict[str, Any]], device: str | None) -> dict[str, Any] | None:
    """The measured teacher row on ``device``, else the first measured teacher row (the reference on CPU)."""
    teachers = [r for r in rows if r["role"] == "teacher" and r["status"] == "ok" and r.get("latency_ms")]
    return next((r for r in teachers if r.get("device") == device), teachers[0] if teachers else None)


def devices(rows: list[dict[str, Any]]) -> list[str]:
    """The devices of the measured rows, the first teacher's first."""
    return list(dict.fromkeys(r["device"] for r in rows if r["status"] == "ok" and r.get("device")))


def recommend(rows: list[dict[str, Any]], budget: float, device: str | None = None) -> dict[str, Any] | None:
    """The fastest measured row (batch-1 p50) on ``device`` whose accuracy is at least the teacher's minus
    ``budget``.

    Ties go to the smaller artifact. The teacher itself is a candidate, so there is always an answer while the
    teacher was measured. Rows on another device are not candidates: a GPU row is never recommended against a CPU
    teacher, nor the other way round.

    Args:
        rows: Report rows; the teacher is the first ``role == "teacher"`` row with ``status == "ok"``.
        budget: Accuracy points (as a fraction) a student may lose, e.g. 0.01.
        device: ``"cpu"`` or ``"cuda"``; ``None``: the first teacher row's device.

    Returns:
        ``{"row", "artifact", "runtime", "model", "precision", "p50_ms", "accuracy", "accuracy_floor", "budget",
        "candidates", "reason"}``, or ``None`` without a measured teacher.
    """
    reference = next((r for r in rows if r["role"] == "teacher" and r["status"] == "ok"), None)
    if reference is None or reference.get("accuracy") is None:
        return None
    device = device or reference.get("device")
    teacher = teacher_for(rows, device) or reference
    floor = teacher["accuracy"] - budget
    within = [
        (i, r)
        for i, r in enumerate(rows)
        if r["status"] == "ok"
        and r.get("device") == device
        and r.get("latency_ms")
        and r.get("accuracy") is not None
        # accuracies are ratios of image counts: a tolerance keeps 0.99 - 0.01 from excluding 0.98
        and r["accuracy"] >= floor - 1e-9
    ]
    if not within:
        return None
    i, best = min(within, key=lambda ir: (ir[1]["latency_ms"]["p50"], ir[1].get("size_bytes") or 0))
    return {
        "row": i,
        "artifact": best["artifact"],
        "runtime": best["runtime"],
        "model": best["model"],
        "precision": best["precision"],
        "p50_ms": best["latency_ms"]["p50"],
        "accuracy": best["accuracy"],
        "device": device,
        "accuracy_floor": floor,
        "budget": budget,
        "candidates": len(within),
        "reason": (
            f"fastest batch-1 p50 ({best['latency_ms']['p50']:.3f} ms) of the {len(within)} measured {device} rows "
            f"with accuracy >= teacher {teacher['accuracy']:.4f} - budget {budget:g} = {floor:.4f}"
        ),
    }


def int8_notes(rows: list[dict[str, Any]]) -> None:
    """Says, on each int8 row, how it compares with the float row of the same model on the same runtime: int8 is
    not always faster (depthwise networks in ONNX Runtime on x86 CPUs often are not), and a report must say so."""
    for r in rows:
        if r["status"] != "ok" or not str(r.get("precision") or "").startswith(("int8", "mixed(int8")):
            continue
        floats = [
            f
            for f in rows
            if f["status"] == "ok"
            and f is not r
            and (f["model"], f["runtime"], f["role"]) == (r["model"], r["runtime"], r["role"])
            and f.get("precision") in ("fp32", "tf32")
        ]
        if not floats or not r.get("latency_ms"):
            continue
        f = min(floats, key=lambda x: x["latency_ms"]["p50"])
        ratio = f["latency_ms"]["p50"] / r["latency_ms"]["p50"]
        verdict = "faster" if ratio >= 1 else "SLOWER"
        r["notes"] = (r.get("notes") or []) + [
            f"int8 is {verdict} than FP32 on {r['runtime']}: p50 {r['latency_ms']['p50']:.3f} vs "
            f"{f['latency_ms']['p50']:.3f} ms ({ratio:.2f}× the FP32 speed)"
        ]


def finish_rows(rows: list[dict[str, Any]], peaks: dict[str, Any] | None) -> None:
    """Fills the cross-row numbers in place: speedup over the teacher, fraction of peak, Pareto membership, and
    how each int8 row compares with its model's FP32 row on the same runtime."""
    int8_notes(rows)
    measured = [r for r in rows if r["status"] == "ok" and r.get("latency_ms") and r.get("accuracy") is not None]
    for device in devices(measured):  # a Pareto front per device: a GPU row does not dominate a CPU deployment
        group = [r for r in measured if r["device"] == device]
        for r, on_front in zip(group, pareto_front([(r["latency_ms"]["p50"], r["accuracy"]) for r in group])):
            r["pareto"] = on_front
    for r in rows:
        if r["status"] != "ok" or not r.get("latency_ms"):
            continue
        teacher = teacher_for(rows, r.get("device"))
        if teacher:
            r["speedup_p50"] = teacher["latency_ms"]["p50"] / r["latency_ms"]["p50"]
            r["speedup_vs"] = f"{teacher['runtime']} ({teacher['device']})"
        key = peak_key(r["precision"], r["compute_ops"])
        r["peak_precision"] = key
        device_peaks = (peaks or {}).get(r["device"]) or {}
        peak = (device_peaks.get(key) or {}).get("ops_per_s") if key else None
        r["peak_ops_per_s"] = peak
        best = r.get("best_throughput") or {}
        r["achieved_ops_per_s"], r["fraction_of_peak"] = fraction_of_peak(r["macs"], best.get("images_per_s"), peak)
