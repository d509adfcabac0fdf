"""``run_benchmark``: the teacher row, then every planned student row, then the cross-row numbers."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from slimforge.export.benchmarking.analysis import devices, finish_rows, recommend
from slimforge.export.benchmarking.config import GPU_TEACHER_RUNTIME, TEACHER_RUNTIME, BenchConfig
from slimforge.export.benchmarking.plan import Target, parse_target, plan_rows, selected_runtimes
from slimforge.export.benchmarking.rows import RowRunner
from slimforge.export.description import artifact_meta
from slimforge.export.evaldata import ValidationSet, data_config_from_meta
from slimforge.export.machine import default_threads, load_average, machine_fingerprint
from slimforge.export.report import now, write_json
from slimforge.export.runtimes import artifact_kind, default_runtime, runtime_class, runtimes_for_kind
from slimforge.train.checkpoint import read_meta, spec_from_meta
from slimforge.train.errors import ConfigError, ExportError, SlimforgeError
from slimforge.train.models import check_class_names, check_factory

logger = logging.getLogger(__name__)

REPORT_FORMAT = "slimforge.benchmark"
REPORT_VERSION = 3


@contextlib.contextmanager
def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with tqdm(total=total, desc="benchmark", unit="row", disable=not enabled, file=sys.stderr) as bar:
        with logging_redirect_tqdm():
            yield bar


def run_benchmark(teacher: str | os.PathLike, students: list[str], cfg: BenchConfig) -> dict[str, Any]:
    """Benchmarks the teacher checkpoint (FP32 eager) and every student artifact on every planned runtime.

    Args:
        teacher: The teacher's slimforge checkpoint directory (``PATH@RUNTIME`` to run it with another
            runtime than FP32 CPU eager, e.g. ``torch-eager-cuda``); its recorded dataset supplies the images.
        students: Artifacts (``PATH`` or ``PATH@RUNTIME``): checkpoint dirs, ``.onnx``, ``.pt`` / ``.ts``.
        cfg: What to run and how much to measure.

    Returns:
        The report: ``machine``, ``settings``, ``peaks``, ``rows`` (``status`` ``ok`` / ``skipped`` / ``error``
        with ``reason``), ``recommendation``, ``not_selected``; see docs/benchmark.md.

    Raises:
        SlimforgeError: the options are invalid, the teacher or its data cannot be loaded or run, or (checked before
            anything is measured) a model's class names differ from the evaluation data's, or a model is a user
            factory and ``cfg.allow_factory`` is off.
    """
    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, fix="fix the benchmark options")
    threads = cfg.timing.threads or default_threads()
    cfg = replace(cfg, timing=replace(cfg.timing, threads=threads))
    torch.set_num_threads(threads)
    start = time.perf_counter()
    t_target = parse_target(str(teacher), "teacher")
    t_target.runtime = t_target.runtime or TEACHER_RUNTIME
    meta = read_meta(t_target.path)
    val = ValidationSet(data_config_from_meta(meta, cfg.data_overrides, where=str(t_target.path)), cfg.max_images)
    runtime_class(t_target.runtime)  # an unknown teacher runtime is a usage error, not a row
    plan = plan_rows(students, cfg.runtimes)
    check_models(meta, t_target.path, plan, val.class_names, cfg.allow_factory)

    machine = machine_fingerprint(threads=threads)
    if machine["load_avg_1m"] is not None and machine["load_avg_1m"] > 0.5 * machine["usable_cores"]:
        logger.warning(
            "the machine is busy (load average %.1f on %d cores): latencies will be noisy",
            machine["load_avg_1m"],
            machine["usable_cores"],
        )
    runner = RowRunner(cfg, val)
    peaks = None
    gpu_teacher = gpu_teacher_target(t_target, plan)
    try:
        with _progress(len(plan) + 1 + (cfg.peak_seconds > 0) + bool(gpu_teacher), cfg.progress) as bar:
            if cfg.peak_seconds > 0:
                bar.set_postfix_str("matmul peak")
                peaks = runner.peaks(threads)
                bar.update()
            bar.set_postfix_str(f"teacher [{t_target.runtime}]")
            t_row, t_preds = runner.measure(t_target, None)
            bar.update()
            if t_row["status"] != "ok":
                raise ExportError(f"the teacher cannot be benchmarked: {t_row['reason']}", t_row["fix"] or "")
            rows = [t_row]
            if gpu_teacher:  # GPU students are compared with the teacher on the same GPU
                bar.set_postfix_str(f"teacher [{gpu_teacher.runtime}]")
                rows.append(runner.measure(gpu_teacher, t_preds)[0])
                bar.update()
            for target in plan:
                bar.set_postfix_str(f"{target.path.name} [{target.runtime or 'default'}]")
                rows.append(runner.measure(target, t_preds)[0])
                bar.update()
    finally:
        runner.close()
    finish_rows(rows, peaks)
    chosen = set(selected_runtimes(cfg.runtimes))
    kinds = {artifact_kind(r["artifact"]) for r in rows if Path(r["artifact"]).exists()}
    not_selected = {
        n: runtime_class(n).summary()
        for kind in sorted(kinds)
        for n in runtimes_for_kind(kind)
        if n not in chosen and not any(r["runtime"] == n for r in rows)
    }
    machine["load_avg_1m_after"] = load_average()
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": now(),
        "note": cfg.note,
        "machine": machine,
        "settings": asdict(cfg),
        "data": {
            **asdict(val.cfg),
            "num_images": len(val),
            "num_classes": len(set(val.labels.tolist())),
            "sampled": val.sampled,
        },
        "teacher": str(t_target.path),
        "peaks": peaks,
        "rows": rows,
        "recommendation": recommend(rows, cfg.accuracy_budget),
        "recommendations": {d: recommend(rows, cfg.accuracy_budget, d) for d in devices(rows)},
        "not_selected": not_selected,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def gpu_teacher_target(teacher: Target, plan: list[Target]) -> Target | None:
    """A second teacher row on the GPU when the teacher runs on the CPU and a planned student row runs on an
    available GPU runtime; ``None`` otherwise."""
    if runtime_class(teacher.runtime).device != "cpu":
        return None
    for t in plan:
        if t.skip or not t.path.exists():
            continue
        name = t.runtime
        if name is None:
            try:
                name = default_runtime(t.path)
            except SlimforgeError:
                continue
        cls = runtime_class(name)
        if cls.device == "cuda" and cls.available()[0]:
            return Target(teacher.path, GPU_TEACHER_RUNTIME, "teacher")
    return None


def check_models(
    teacher_meta: dict[str, Any], teacher: Path, plan: list[Target], class_names: list[str], allow_factory: bool
) -> None:
    """Refuses, before anything is measured, a teacher or student whose class names (or their order) differ from
    the evaluation data's, and one whose description names a user factory without ``allow_factory``. A student
    whose description cannot be read is left to its row, which reports why.

    Raises:
        ModelError / CheckpointError: naming the model and the difference.
    """
    fix = (
        "benchmark models trained on the same classes in the same order, or evaluate on data with these classes "
        "(--data key=value overrides the teacher's recorded dataset)"
    )
    described = [(f"teacher checkpoint {teacher}", "teacher", teacher_meta)]
    for path in dict.fromkeys(t.path for t in plan if t.path.exists()):
        try:
            described.append((f"student {path}", "student", artifact_meta(path)))
        except Exception:  # an unreadable description: that row reports it
            continue
    for subject, role, meta in described:
        try:
            spec = spec_from_meta(meta, subject)
        except SlimforgeError:  # its row reports it
            continue
        check_factory(spec, allow_factory, subject, "pass --allow-factory")
        check_class_names(spec.class_names, class_names, subject, (role, "evaluation data"), fix)


def write_benchmark(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes ``benchmark.json``, ``.csv``, ``.md`` and the self-contained ``benchmark.html`` into ``out_dir``.

    Returns:
        ``{"json": path, "csv": path, "md": path, "html": path}``.

    Raises:
        ExportError: a file cannot be written (``export/benchmark.py`` checks the folder before measuring).
    """
    from slimforge.export.report import csv_table, markdown_table, write_text
    from slimforge.export.report_html import html_report

    out = Path(out_dir)
    try:
        return {
            "json": write_json(out / "benchmark.json", report),
            "csv": write_text(out / "benchmark.csv", csv_table(report)),
            "md": write_text(out / "benchmark.md", markdown_table(report)),
            "html": write_text(out / "benchmark.html", html_report(report)),
        }
    except OSError as e:
        raise ExportError(
            f"cannot write the benchmark report into {out}: {e.strerror or e}", "free space or pass another --out"
        ) from None
