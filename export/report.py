"""Report plumbing: atomic JSON/text files, the machine fingerprint, the benchmark's Markdown and CSV tables.

The HTML page with the Pareto plot is :mod:`slimforge.export.report_html`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any


def configure_logging(verbose: bool = False) -> None:
    """Entry-script logging: slimforge's own loggers at INFO (DEBUG with ``verbose``), third-party ones (e.g.
    onnxscript's graph optimiser, which logs every pass at INFO) at WARNING."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    for name in ("export", "train", "compress"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def add_input_arguments(parser, action: str, data_help: str) -> None:
    """The options both export CLIs end with: ``--allow-factory``, ``--data KEY=VALUE ...``, ``-v``.

    Args:
        parser: The entry's ``argparse.ArgumentParser``.
        action: What the entry does with a factory model, for the help ("export", "benchmark").
        data_help: Help for ``--data`` (whose recorded DataConfig it overrides).
    """
    parser.add_argument(
        "--allow-factory",
        action="store_true",
        help=f"{action} models of a user factory (source: factory): rebuilding one imports and runs the code it names",
    )
    parser.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE", help=data_help)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (full tracebacks)")


def _jsonable(obj: Any) -> Any:
    # Standard JSON has no NaN/inf: a failed comparison's infinite diff is written as null.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` under a temporary name, then renames it: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Writes ``obj`` as indented standard JSON (non-finite floats become ``null``), atomically."""
    return write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value / scale, spec)


def _best(r: dict[str, Any]) -> str:
    b = r.get("best_throughput") or {}
    return f"{b['images_per_s']:.1f} (bs {b['batch_size']})" if b else "—"


def _memory(r: dict[str, Any]) -> Any:
    m = r.get("memory") or {}
    return m.get("rss_increase_mb") if m.get("rss_increase_mb") is not None else m.get("peak_rss_mb")


def _spread(lat: dict[str, Any]) -> str:
    if lat.get("spread") is None:
        return "—"
    return f"{lat['spread']:.1%}" + ("" if lat.get("stable", True) else " ⚠")


def unstable_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Measured rows whose batch-1 round medians differ by more than the benchmark's ``unstable_spread``."""
    return [r for r in report["rows"] if (r.get("latency_ms") or {}).get("stable") is False]


def unstable_names(rows: list[dict[str, Any]]) -> str:
    """``artifact [runtime] spread%`` of each row, comma-separated (Markdown and HTML name them alike)."""
    return ", ".join(f"{r['artifact']} [{r['runtime']}] {r['latency_ms']['spread']:.0%}" for r in rows)


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The summary table shared by Markdown and HTML: ``(header, rows of cells)``."""
    header = [
        "model",
        "runtime",
        "precision",
        "accuracy",
        "agreement",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "spread",
        "best img/s",
        "mem MB",
        "% of peak",
        "params (M)",
        "MMACs",
        "int8 MACs",
        "size (MB)",
        "speedup (p50)",
        "status",
    ]
    recs = [report.get("recommendation"), *(report.get("recommendations") or {}).values()]
    rec = {r["row"] for r in recs if r}
    out = []
    for i, r in enumerate(report["rows"]):
        lat = r.get("latency_ms") or {}
        speedup = _fmt(r.get("speedup_p50"), ".2f")
        status = r["status"] + (" ★ recommended" if i in rec else "")
        out.append(
            [
                f"{r['model']} ({r['role']})",
                r["runtime"],
                r.get("precision") or "—",
                _fmt(r.get("accuracy"), ".4f"),
                _fmt(r.get("agreement"), ".4f"),
                _fmt(lat.get("p50"), ".3f"),
                _fmt(lat.get("p90"), ".3f"),
                _fmt(lat.get("p99"), ".3f"),
                _spread(lat),
                _best(r),
                _fmt(_memory(r), ".0f"),
                _fmt(r.get("fraction_of_peak"), ".1%"),
                _fmt(r.get("params"), ".3f", 1e6),
                _fmt(r.get("macs"), ".1f", 1e6),
                _fmt(r.get("int8_mac_fraction"), ".1%"),
                _fmt(r.get("size_bytes"), ".2f", 1e6),
                speedup + ("×" if speedup != "—" else ""),
                status,
            ]
        )
    return header, out


def headline(report: dict[str, Any]) -> str:
    """One paragraph: machine, threads, data, timing settings."""
    m, s, d = report["machine"], report["settings"]["timing"], report["data"]
    data = d["source"] if d["source"] in ("synthetic", "imagefolder") else f"{d['source']}:{d['name']}"
    sample = "; a seeded class-stratified sample of the split" if d.get("sampled") else ""
    classes = f" ({d['num_classes']} classes{sample})" if d.get("num_classes") else ""
    return (
        f"Benchmark on {m['cpu']} ({m['usable_cores']} usable cores{', GPU ' + m['gpu'] if m.get('gpu') else ''}), "
        f"{s['threads']} threads, torch {m['torch']}, onnxruntime {m.get('onnxruntime')}, openvino "
        f"{m.get('openvino')}; {d['num_images']} validation images{classes} of {data} ({d['image_size']} px); "
        f"latency at batch 1 over at least {s['runs']} runs in {s.get('rounds', 1)} rounds of at least "
        f"{s.get('min_round_s', 0)} s after {s['warmup']} warm-ups (p50: median of the round medians; spread: "
        f"slowest minus fastest round median over the p50); throughput over batch sizes {s['batch_sizes']} "
        f"(at least {s['throughput_runs']} runs each); "
        f"load average {m.get('load_avg_1m')} at start, {m.get('load_avg_1m_after')} at the end."
    )


def peaks_line(report: dict[str, Any]) -> str:
    """The measured matmul peaks, one clause per device and precision."""
    peaks = report.get("peaks")
    if not peaks:
        return "Matmul peak not measured (--peak-seconds 0): no fraction of peak."
    parts = []
    for device in ("cpu", "cuda"):
        for key, p in (peaks.get(device) or {}).items():
            if p.get("ops_per_s"):
                unit = "TOP/s" if key == "int8" else "TFLOP/s"
                parts.append(f"{device} {key} {p['ops_per_s'] / 1e12:.3f} {unit} ({p['best']})")
            elif p.get("skipped"):
                parts.append(f"{device} {key}: {p['skipped']}")
    return "Measured matmul peak: " + "; ".join(parts) + "."


def over_peak_warning(rows: list[dict[str, Any]]) -> str:
    """What a fraction of peak above 1 (beyond 5% noise) can mean."""
    names = ", ".join(f"{r['model']} [{r['runtime']}] {r['fraction_of_peak']:.0%}" for r in rows)
    return (
        f"Note: above the measured matmul peak: {names}. Either other load slowed the peak measurement, the row's "
        "kernels outrun a square matmul of that size, or it computes fewer operations than its MACs say (Winograd, "
        "sparsity). Compare such rows with each other rather than with 100%."
    )


def markdown_table(report: dict[str, Any]) -> str:
    """The benchmark report as Markdown: headline, one table row per artifact × runtime, then the recommendation,
    skipped and failed rows with their reasons, and runtimes that were not selected."""
    header, rows = table_rows(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    out = (f"**{report['note']}**\n\n" if report.get("note") else "") + headline(report) + "\n\n"
    out += "\n".join(lines) + "\n\n" + peaks_line(report) + "\n"
    over = [r for r in report["rows"] if (r.get("fraction_of_peak") or 0) > 1.05]
    if over:
        out += f"\n{over_peak_warning(over)}\n"
    unstable = unstable_rows(report)
    if unstable:
        limit = report["settings"]["timing"].get("unstable_spread", 0.1)
        names = unstable_names(unstable)
        out += (
            f"\nUnstable (⚠, round medians more than {limit:.0%} apart): {names}. The machine changed speed during "
            "these rows: rerun the benchmark (more --rounds, a longer --min-round-s) before trusting their p50.\n"
        )
    rec = report.get("recommendation")
    others = [r for r in (report.get("recommendations") or {}).values() if r and rec and r["row"] != rec["row"]]
    for i, r in enumerate([rec, *others] if rec else []):
        where = "" if i == 0 else f" on {r['device']} (speedups of {r['device']} rows are over the teacher there)"
        out += (
            f"\nRecommended{where} (accuracy budget {r['budget']:g}): **{r['artifact']} [{r['runtime']}]**, "
            f"{r['precision']}, p50 {r['p50_ms']:.3f} ms, accuracy {r['accuracy']:.4f} — {r['reason']}.\n"
        )
    notes = [f"- {r['artifact']} [{r['runtime']}]: {n}" for r in report["rows"] for n in r.get("notes") or []]
    if notes:
        out += "\nNotes:\n" + "\n".join(notes) + "\n"
    skipped = [r for r in report["rows"] if r["status"] == "skipped"]
    errors = [r for r in report["rows"] if r["status"] == "error"]
    if skipped:
        out += "\nSkipped:\n" + "\n".join(f"- {r['artifact']} [{r['runtime']}]: {r['reason']}" for r in skipped) + "\n"
    if errors:
        out += "\nErrors:\n" + "\n".join(f"- {r['artifact']} [{r['runtime']}]: {r['reason']}" for r in errors) + "\n"
    if report.get("not_selected"):
        names = ", ".join(report["not_selected"])
        out += f"\nNot selected (add with --runtimes NAME or --runtimes all): {names}.\n"
    return out


CSV_COLUMNS = (
    "role",
    "model",
    "artifact",
    "runtime",
    "status",
    "reason",
    "precision",
    "peak_precision",
    "device",
    "threads",
    "accuracy",
    "agreement",
    "num_images",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "min_ms",
    "spread",
    "stable",
    "best_images_per_s",
    "best_batch_size",
    "throughput_at_max_batch",
    "rss_increase_mb",
    "peak_rss_mb",
    "gpu_peak_mb",
    "params",
    "macs",
    "int8_mac_fraction",
    "size_bytes",
    "speedup_p50",
    "speedup_vs",
    "achieved_ops_per_s",
    "peak_ops_per_s",
    "fraction_of_peak",
    "pareto",
    "load_seconds",
    "first_run_seconds",
    "row_seconds",
)


def csv_table(report: dict[str, Any]) -> str:
    """One CSV line per row (flat columns, :data:`CSV_COLUMNS`, then ``images_per_s_bs<N>`` per swept size)."""
    sizes = report["settings"]["timing"]["batch_sizes"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *(f"images_per_s_bs{b}" for b in sizes)])
    for r in report["rows"]:
        lat, mem, best = r.get("latency_ms") or {}, r.get("memory") or {}, r.get("best_throughput") or {}
        flat = {
            **r,
            **{f"{k}_ms": lat.get(k) for k in ("p50", "p90", "p99", "mean", "min")},
            "spread": lat.get("spread"),
            "stable": lat.get("stable"),
            "best_images_per_s": best.get("images_per_s"),
            "best_batch_size": best.get("batch_size"),
            **{k: mem.get(k) for k in ("rss_increase_mb", "peak_rss_mb", "gpu_peak_mb")},
        }
        per_size = {s["batch_size"]: s["images_per_s"] for s in r.get("throughput") or []}
        cells = [flat.get(c) for c in CSV_COLUMNS] + [per_size.get(b) for b in sizes]
        writer.writerow(["" if v is None else v for v in cells])
    return buf.getvalue()
