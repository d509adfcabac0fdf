"""The benchmark as one self-contained HTML page: an accuracy-vs-latency Pareto plot (PNG embedded as base64,
drawn with matplotlib's Agg canvas, no display needed), the summary table, skipped and failed rows with their
reasons, the throughput sweep, what each runtime computed in, the measured peaks, the machine and the method.

Example:
    >>> from slimforge.export.report_html import html_report, pareto_png
    >>> Path("bench/benchmark.html").write_text(html_report(report))  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import logging
from typing import Any

import numpy as np

from slimforge.export.report import (
    headline,
    over_peak_warning,
    peaks_line,
    table_rows,
    unstable_names,
    unstable_rows,
)
from slimforge.train.errors import ExportError

logger = logging.getLogger(__name__)

_MARKERS = {"fp32": "o", "tf32": "P", "bf16": "s", "fp16": "D", "int8": "^"}
_LABEL_HEIGHTS = (14, -16, 28, -30, 42, -44, 56, -58)  # points above (+) / below (-) the marker


def _marker(precision: str | None) -> str:
    if not precision:
        return "x"
    if precision.startswith("mixed("):
        return "v"
    return _MARKERS.get(precision, "x")


def _import_matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ExportError(f"matplotlib cannot be imported ({e})", "pip install matplotlib") from None
    return Figure


def pareto_png(report: dict[str, Any]) -> bytes | None:
    """The accuracy-vs-latency plot as PNG bytes; ``None`` when no row was measured.

    x: batch-1 p50 latency (ms, log scale); y: validation accuracy. The teacher is the star, the dashed step line
    the Pareto front (no other row is both faster and more accurate), the dotted line the accuracy budget, the
    ring the recommended row. Marker shape is the precision, colour the runtime.
    """
    Figure = _import_matplotlib()
    rows = [r for r in report["rows"] if r["status"] == "ok" and r.get("latency_ms") and r.get("accuracy") is not None]
    if not rows:
        return None
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    several_models = len({r["model"] for r in rows if r["role"] != "teacher"}) > 1
    fig = Figure(figsize=(10, 5.6), dpi=110)  # a bare Figure renders with Agg: no pyplot, no global state
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i % 10}" for i in range(len(runtimes))]
    colour = dict(zip(runtimes, colours))
    # Rows of one model share its accuracy on one horizontal line: fan their labels out over eight heights (in
    # latency order, with leader lines), so neighbours never share a height.
    level: dict[int, int] = {}
    for k in sorted(range(len(rows)), key=lambda k: (round(rows[k]["accuracy"], 3), rows[k]["latency_ms"]["p50"])):
        group = [j for j in level if round(rows[j]["accuracy"], 3) == round(rows[k]["accuracy"], 3)]
        level[k] = len(group) % len(_LABEL_HEIGHTS)
    lo, hi = min(r["latency_ms"]["p50"] for r in rows), max(r["latency_ms"]["p50"] for r in rows)
    for i, r in enumerate(rows):
        x, y = r["latency_ms"]["p50"], 100 * r["accuracy"]
        teacher = r["role"] == "teacher"
        ax.scatter(
            x,
            y,
            marker="*" if teacher else _marker(r.get("precision")),
            s=320 if teacher else 80,
            color=colour[r["runtime"]],
            edgecolors="black",
            linewidths=1.2 if teacher else 0.6,
            zorder=4,
        )
        label = f"{r['runtime']} ({r.get('precision')})"
        if teacher:
            label = f"teacher ({r['model']}, FP32 eager)"
        elif several_models:
            label = f"{r['model']} · {label}"
        right = np.log(x / lo) > 0.7 * np.log(hi / lo) if hi > lo else False  # label the right end leftwards
        ax.annotate(
            label,
            (x, y),
            xytext=(-8 if right else 8, _LABEL_HEIGHTS[level[i]]),
            textcoords="offset points",
            ha="right" if right else "left",
            va="center",
            fontsize=7.5,
            zorder=5,
            annotation_clip=False,
            arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 4},
        )
    front = sorted(((r["latency_ms"]["p50"], 100 * r["accuracy"]) for r in rows if r.get("pareto")), key=lambda p: p[0])
    if len(front) > 1:
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", linestyle="--", color="grey", linewidth=1, zorder=2, label="Pareto front")
    rec = report.get("recommendation")
    if rec:
        floor = 100 * rec["accuracy_floor"]
        ax.axhline(floor, linestyle=":", color="firebrick", linewidth=1, zorder=1)
        ax.annotate(
            f"accuracy budget: teacher − {100 * rec['budget']:g} pt",
            (0.01, floor),
            xycoords=("axes fraction", "data"),
            xytext=(0, -11),
            textcoords="offset points",
            fontsize=7.5,
            color="firebrick",
        )
        ax.scatter(
            rec["p50_ms"],
            100 * rec["accuracy"],
            s=600,
            facecolors="none",
            edgecolors="firebrick",
            linewidths=2,
            zorder=3,
        )
        ax.scatter([], [], s=120, facecolors="none", edgecolors="firebrick", linewidths=2, label="recommended")
    lats = [r["latency_ms"]["p50"] for r in rows]
    if max(lats) / min(lats) > 4:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        # Plain numbers at 1-2-5 steps; matplotlib's default labels minor ticks as overlapping 3×10^-1, 4×10^-1.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    for rt in runtimes:
        ax.scatter([], [], marker="o", color=colour[rt], edgecolors="black", linewidths=0.6, label=rt)
    for name, marker in (*_MARKERS.items(), ("mixed", "v")):
        if any(_marker(r.get("precision")) == marker for r in rows):
            ax.scatter([], [], marker=marker, color="white", edgecolors="black", label=f"precision {name}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_xlabel("latency at batch 1, p50 (ms)" + (", log scale" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("validation accuracy (%)")
    title = f"Accuracy vs latency — {report['machine']['cpu']}, {report['settings']['timing']['threads']} threads"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.margins(x=0.15, y=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
p.head { max-width: 1250px; color: #444; font-size: 13px; }
.note { background: #fff4d6; border: 1px solid #e6c36a; padding: 8px 12px; max-width: 1230px; font-weight: 600; }
.rec { background: #e9f6ec; border: 1px solid #7cc08a; padding: 10px 14px; max-width: 1230px; font-size: 14px; }
table { border-collapse: collapse; font-size: 12px; margin-top: 6px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td.l, th.l { text-align: left; }
tr.teacher td { background: #eef3ff; font-weight: 600; } tr.recommended td { background: #e9f6ec; }
tr.skipped td { color: #888; background: #fafafa; } tr.error td { color: #a00; background: #fff1f1; }
img.plot { max-width: 1200px; width: 100%; border: 1px solid #ddd; }
ul { font-size: 13px; } code { font-size: 12px; }
"""


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None, left: int = 2) -> str:
    def cell(tag: str, i: int, text: Any) -> str:
        return f"<{tag}{' class=l' if i < left else ''}>{html.escape(str(text))}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr>"]
    for k, cells in enumerate(rows):
        cls = f' class="{classes[k]}"' if classes and classes[k] else ""
        out.append(f"<tr{cls}>" + "".join(cell("td", i, c) for i, c in enumerate(cells)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _ops(value: float | None) -> str:
    return "—" if not value else f"{value / 1e9:.1f} G"


def html_report(report: dict[str, Any]) -> str:
    """The whole report as a standalone HTML page (no external files, scripts or fonts)."""
    esc = html.escape
    rows = report["rows"]
    rec = report.get("recommendation")
    timing = report["settings"]["timing"]
    png = pareto_png(report)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>slimforge benchmark</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>slimforge benchmark: students vs the FP32 teacher</h1>",
    ]
    if report.get("note"):
        parts.append(f"<p class=note>{esc(report['note'])}</p>")
    parts.append(f"<p class=head>{esc(headline(report))} Created {esc(report['created'])}.</p>")
    others = [r for r in (report.get("recommendations") or {}).values() if r and rec and r["row"] != rec["row"]]
    for i, r in enumerate([rec, *others] if rec else []):
        where = "" if i == 0 else f" on {r['device']}"
        parts.append(
            f"<p class=rec>Recommended{esc(where)} within an accuracy budget of {r['budget']:g}: "
            f"<b>{esc(r['artifact'])} [{esc(r['runtime'])}]</b>, {esc(str(r['precision']))}, p50 {r['p50_ms']:.3f} ms, "
            f"accuracy {r['accuracy']:.4f}. <br><small>{esc(r['reason'])}.</small></p>"
        )
    if png:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<img class=plot alt='accuracy vs latency Pareto plot' src='data:image/png;base64,{data}'>")
    else:
        parts.append("<p>No row was measured: nothing to plot.</p>")

    over = [r for r in rows if (r.get("fraction_of_peak") or 0) > 1.05]
    if over:
        parts.append(f"<p class=note>{esc(over_peak_warning(over))}</p>")
    unstable = unstable_rows(report)
    if unstable:
        names = unstable_names(unstable)
        parts.append(
            f"<p class=note>Unstable (⚠): the machine changed speed during {esc(names)}; rerun before trusting "
            "their p50.</p>"
        )
    header, cells = table_rows(report)
    classes = []
    for i, r in enumerate(rows):
        cls = r["status"] if r["status"] != "ok" else ("teacher" if r["role"] == "teacher" else "")
        classes.append("recommended" if rec and i in {r["row"] for r in [rec, *others]} else cls)
    parts += ["<h2>Results</h2>", _table(header, cells, classes, left=3)]
    parts.append(
        "<p class=head>mem MB: peak resident memory added by loading and running the row (see Method). "
        "% of peak: achieved operations/s (2 × MACs × best images/s) over the machine's measured matmul peak of the "
        "precision the row computed in. Speedup: teacher p50 / row p50.</p>"
    )

    notes = [(r, n) for r in rows for n in r.get("notes") or []]
    if notes:
        items = "".join(f"<li>{esc(r['artifact'])} [{esc(r['runtime'])}]: {esc(n)}</li>" for r, n in notes)
        parts.append(f"<h2>Notes</h2><ul>{items}</ul>")
    skipped = [r for r in rows if r["status"] in ("skipped", "error")]
    if skipped:
        parts.append("<h2>Skipped and failed rows</h2><ul>")
        for r in skipped:
            fix = f" <i>Fix: {esc(r['fix'])}</i>" if r.get("fix") else ""
            parts.append(
                f"<li><b>{esc(r['status'])}</b> {esc(r['artifact'])} [{esc(r['runtime'])}]: {esc(str(r['reason']))}"
                f"{fix}</li>"
            )
        parts.append("</ul>")
    if report.get("not_selected"):
        items = "".join(f"<li>{esc(n)}: {esc(s)}</li>" for n, s in report["not_selected"].items())
        parts.append(f"<h2>Runtimes not selected</h2><p class=head>Add with --runtimes NAME or all.</p><ul>{items}")
        parts.append("</ul>")

    sizes = report["settings"]["timing"]["batch_sizes"]
    sweep_rows, precision_rows = [], []
    for r in rows:
        if r["status"] != "ok":
            continue
        per = {s["batch_size"]: s["images_per_s"] for s in r.get("throughput") or []}
        sweep_rows.append([r["model"], r["runtime"], *(f"{per[b]:.1f}" if b in per else "—" for b in sizes)])
        mem = r.get("memory") or {}
        precision_rows.append(
            [
                r["model"],
                r["runtime"],
                r.get("precision") or "—",
                ", ".join(f"{k}: {v}" for k, v in (r.get("compute_ops") or {}).items()) or "—",
                r.get("peak_precision") or "—",
                _ops(r.get("achieved_ops_per_s")),
                _ops(r.get("peak_ops_per_s")),
                "—" if mem.get("peak_rss_mb") is None else f"{mem['peak_rss_mb']:.0f}",
                "—" if mem.get("gpu_peak_mb") is None else f"{mem['gpu_peak_mb']:.0f}",
                f"{r['load_seconds']:.2f}",
                f"{r['first_run_seconds']:.3f}",
                "; ".join(f"{k}={v}" for k, v in (r.get("runtime_details") or {}).items()),
            ]
        )
    parts += ["<h2>Throughput sweep (images/s)</h2>", _table(["model", "runtime", *map(str, sizes)], sweep_rows)]
    parts += [
        "<h2>What each runtime computed in</h2>",
        _table(
            [
                "model",
                "runtime",
                "precision",
                "conv/matmul kernels",
                "peak used",
                "achieved ops/s",
                "peak ops/s",
                "process peak RSS MB",
                "GPU peak MB",
                "load s",
                "first run s",
                "details",
            ],
            precision_rows,
            left=5,
        ),
    ]

    peaks = report.get("peaks") or {}
    peak_rows = []
    for device in ("cpu", "cuda"):
        for key, p in (peaks.get(device) or {}).items():
            kernels = "; ".join(
                f"{k}: {_ops(v)}" if isinstance(v, float) else f"{k}: {v}" for k, v in (p.get("kernels") or {}).items()
            )
            peak_rows.append([device, key, _ops(p.get("ops_per_s")), p.get("best") or p.get("skipped") or "—", kernels])
    parts += ["<h2>Measured matmul peak</h2>", f"<p class=head>{esc(peaks_line(report))}</p>"]
    if peak_rows:
        parts.append(_table(["device", "precision", "ops/s", "best kernel", "all kernels"], peak_rows, left=2))

    m = report["machine"]
    parts += ["<h2>Machine</h2>", _table(["key", "value"], [[k, "—" if v is None else v] for k, v in m.items()])]
    parts += [
        "<h2>Method</h2><ul>",
        "<li>Every row runs on the same validation images and the same number of CPU threads; "
        + ("each row is measured in a fresh process. " if report["settings"].get("isolate") else "")
        + "Accuracy is against the labels, agreement is top-1 agreement with the FP32 eager teacher.</li>",
        "<li>Latency: single-image calls after warm-up, each returning once the logits are ready, in "
        f"{timing.get('rounds', 1)} rounds of at least {timing['runs']} calls in all, each round lasting at least "
        f"{timing.get('min_round_s', 0)} s; p50 is the median of the round medians, p90/p99 are over every call, "
        "spread is the slowest minus the fastest round median over the p50 (⚠ above "
        f"{timing.get('unstable_spread', 0.1):.0%}). Throughput: at least {timing['throughput_runs']} calls and "
        f"{timing.get('min_round_s', 0)} s per batch size.</li>",
        "<li>Memory: the process's peak resident set is reset (Linux /proc/self/clear_refs) just before the artifact "
        "is loaded and read after the last timed call; mem MB is that peak minus the resident set before loading.</li>",
        "<li>Peak: the fastest square matrix multiply per precision with the same threads (PyTorch and ONNX Runtime "
        "kernels, 2·n³ operations each); a row's fraction is 2 × MACs × images/s at its best batch size over the "
        "peak of the precision it computed in. MACs count convolutions and matmuls only.</li>",
        "<li>Precision: read back from the runtime where it can tell — OpenVINO's execution graph (per-layer runtime "
        "precision), ONNX Runtime's optimised graph for quantised models (how many Q/DQ pairs became integer "
        "kernels) — else the weights' dtype or the autocast dtype.</li>",
        "</ul>",
        f"<p class=head>Report format {esc(report['format'])} v{report['version']}; settings: "
        f"<code>{esc(str(report['settings']))}</code></p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
