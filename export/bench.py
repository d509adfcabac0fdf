"""The student-vs-teacher benchmark: every artifact on every runtime it can deploy on, one row each.

A run plan is artifacts × runtimes: an artifact named ``PATH@RUNTIME`` gets that runtime; any other gets every
selected runtime registered for its kind (a checkpoint: eager FP32, bf16 autocast, channels_last, CUDA; an
``.onnx``: ONNX Runtime CPU/CUDA/TensorRT, OpenVINO; ``.ts``: TorchScript CPU/CUDA). A runtime this machine
cannot run becomes a *skipped* row with the reason; an artifact that cannot be loaded or run becomes an *error*
row; the other rows still complete. Only a teacher that cannot run stops the benchmark (nothing to compare with).

Every row is measured the same way, with the same threads and the same real validation images
(:mod:`export.measure`, by default each in a fresh process): accuracy and top-1 agreement with the FP32 eager
teacher, batch-1 latency percentiles, throughput over a batch sweep, peak memory, size, parameters and MACs, the
precision the runtime actually computed in, and the fraction of this machine's measured matrix-multiply peak of
that precision it achieved (:mod:`export.peak`). The report recommends the fastest row within an accuracy
budget of the teacher (:func:`recommend`).

Example:
    >>> from export.bench import BenchConfig, run_benchmark
    >>> report = run_benchmark("runs/teacher/checkpoint", ["runs/student/export/model.onnx"], BenchConfig())
    ... # doctest: +SKIP
    >>> [(r["runtime"], r["status"]) for r in report["rows"]]  # doctest: +SKIP
    [('torch-eager', 'ok'), ('ort-cpu', 'ok'), ('ort-cuda', 'skipped'), ('ort-tensorrt', 'skipped'), ('openvino', 'ok')]
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.api import apply_recipe_
from compress.stats import count_macs, count_parameters
from export.api import MODEL_JSON
from export.evaldata import ValidationSet, data_config_from_meta
from export.measure import TimingConfig, measure_artifact
from export.peak import fraction_of_peak, measure_peaks, peak_key
from export.report import load_average, machine_fingerprint, now, write_json
from export.runtimes import (
    CHECKPOINT_KIND,
    artifact_kind,
    available_runtimes,
    default_runtime,
    default_threads,
    runtime_class,
    runtimes_for_kind,
)
from train.checkpoint import read_meta
from train.errors import ConfigError, ExportError, SlimforgeError
from train.models import ModelSpec, create_model

logger = logging.getLogger(__name__)

REPORT_FORMAT = "slimforge.benchmark"
REPORT_VERSION = 2
TEACHER_RUNTIME = "torch-eager"
SELECTIONS = ("default", "all")
_ROOT = Path(__file__).resolve().parents[1]

# Every row carries every key, so a consumer never has to special-case an error or skipped row.
_METRICS = (
    "precision",
    "compute_ops",
    "device",
    "threads",
    "accuracy",
    "agreement",
    "num_images",
    "latency_ms",
    "throughput",
    "throughput_at_max_batch",
    "best_throughput",
    "memory",
    "params",
    "macs",
    "size_bytes",
    "speedup_p50",
    "achieved_ops_per_s",
    "peak_precision",
    "peak_ops_per_s",
    "fraction_of_peak",
    "pareto",
    "load_seconds",
    "first_run_seconds",
    "runtime_details",
)


@dataclass
class BenchConfig:
    """What to run and how much to measure."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    """Throughput sweep."""
    runs: int = 200
    """Timed batch-1 runs for the latency percentiles."""
    warmup: int = 10
    """Untimed runs before each timed series (allocator, kernel selection, caches)."""
    throughput_runs: int = 20
    """Timed runs per batch size of the sweep."""
    threads: int | None = None
    """Intra-op CPU threads of every runtime and of the peak measurement; ``None``: all usable cores."""
    max_images: int | None = 512
    """Validation images for accuracy and agreement; ``None``: the whole validation split."""
    eval_batch_size: int = 32
    data_overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of the teacher checkpoint's recorded DataConfig."""
    runtimes: list[str] = field(default_factory=lambda: ["default"])
    """Runtimes planned for artifacts that name none: registered names, ``default`` (every runtime that is not
    opt-in) and/or ``all``. A selected runtime this machine lacks becomes a skipped row with the reason."""
    accuracy_budget: float = 0.01
    """Recommend the fastest row whose accuracy is at least the teacher's minus this (0.01 = one point)."""
    isolate: bool = True
    """Measure each row in a fresh process: its own peak memory, and a crashing runtime loses only its row."""
    row_timeout: float = 1800.0
    """Seconds one isolated row may take before it is reported as an error."""
    peak_seconds: float = 1.0
    """Timed seconds per kernel of the matmul peak measurement; 0 skips it (no fraction of peak)."""
    peak_size: int = 2048
    """Square matrix size of the CPU peak measurement (large enough to be compute-bound)."""
    progress: bool = True
    """A tqdm progress bar on stderr."""
    note: str = ""
    """Free text printed at the top of the report (e.g. "random-init weights: accuracy is meaningless")."""

    def validate(self) -> list[str]:
        p = []
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            p.append(f"batch_sizes: {self.batch_sizes} must be positive integers")
        for name in ("runs", "throughput_runs", "eval_batch_size"):
            if getattr(self, name) < 1:
                p.append(f"{name}: {getattr(self, name)} must be >= 1")
        if self.warmup < 0:
            p.append(f"warmup: {self.warmup} must be >= 0")
        if self.threads is not None and self.threads < 1:
            p.append(f"threads: {self.threads} must be >= 1")
        if self.max_images is not None and self.max_images < 1:
            p.append(f"max_images: {self.max_images} must be >= 1")
        unknown = [r for r in self.runtimes if r not in SELECTIONS and r not in available_runtimes()]
        if unknown or not self.runtimes:
            p.append(f"runtimes: {unknown or 'none'}; choose from {', '.join([*SELECTIONS, *available_runtimes()])}")
        if not 0 <= self.accuracy_budget <= 1:
            p.append(f"accuracy_budget: {self.accuracy_budget} must be in [0, 1] (0.01 = one accuracy point)")
        if self.row_timeout <= 0:
            p.append(f"row_timeout: {self.row_timeout} must be > 0")
        if self.peak_seconds < 0:
            p.append(f"peak_seconds: {self.peak_seconds} must be >= 0")
        if self.peak_size < 16:
            p.append(f"peak_size: {self.peak_size} must be >= 16")
        return p

    def timing(self) -> TimingConfig:
        return TimingConfig(
            batch_sizes=list(self.batch_sizes),
            runs=self.runs,
            warmup=self.warmup,
            throughput_runs=self.throughput_runs,
            threads=self.threads,
            eval_batch_size=self.eval_batch_size,
        )


@dataclass
class Target:
    """One row to measure: a path, the runtime to run it with (``None``: its kind's default) and its role."""

    path: Path
    runtime: str | None
    role: str
    skip: str | None = None
    """Why it is not measured, decided while planning."""


def parse_target(text: str, role: str) -> Target:
    """``PATH`` or ``PATH@RUNTIME`` (e.g. ``out/model.onnx@ort-cuda``)."""
    head, sep, tail = text.rpartition("@")
    if sep and tail in available_runtimes():
        return Target(Path(head), tail, role)
    return Target(Path(text), None, role)


def selected_runtimes(selection: list[str]) -> list[str]:
    """Runtime names a selection means, in registration order: ``default`` = all that are not opt-in."""
    names: set[str] = set()
    for item in selection:
        if item == "all":
            names.update(available_runtimes())
        elif item == "default":
            names.update(n for n in available_runtimes() if not runtime_class(n).opt_in)
        else:
            names.add(item)
    return [n for n in available_runtimes() if n in names]


def plan_rows(students: list[str], selection: list[str]) -> list[Target]:
    """The student rows: each artifact × every selected runtime for its kind (one row when it names a runtime).

    An artifact that does not exist, or whose kind no runtime runs, keeps one row that will report the error;
    one whose kind no *selected* runtime runs keeps one skipped row that says which runtimes would.
    """
    chosen = selected_runtimes(selection)
    rows = []
    for text in students:
        target = parse_target(text, "student")
        if target.runtime is not None or not target.path.exists():
            rows.append(target)
            continue
        kind = artifact_kind(target.path)
        names = [n for n in runtimes_for_kind(kind) if n in chosen]
        if names:
            rows.extend(Target(target.path, n, "student") for n in names)
        elif runtimes_for_kind(kind):
            target.skip = (
                f"none of the selected runtimes runs a {kind} artifact; select one of "
                f"{', '.join(runtimes_for_kind(kind))} with --runtimes"
            )
            rows.append(target)
        else:
            rows.append(target)  # measuring it reports "no runtime runs ..."
    return rows


def artifact_meta(path: Path) -> dict[str, Any]:
    """The model description of an artifact: a checkpoint's own JSON, or the ``model.json`` export.py wrote beside
    an exported file.

    Raises:
        CheckpointError / ExportError: it is missing or unreadable.
    """
    if artifact_kind(path) == CHECKPOINT_KIND:
        return read_meta(path)
    if not path.is_file():
        raise ExportError(f"artifact {str(path)!r} does not exist", "check the path (export/export.py writes them)")
    model_json = path.parent / MODEL_JSON
    if not model_json.is_file():
        raise ExportError(
            f"no {MODEL_JSON} beside {path}: its input size, normalisation and classes are unknown",
            f"benchmark artifacts written by export/export.py (it writes {MODEL_JSON}), or copy the source "
            f"checkpoint's slimforge.json there as {MODEL_JSON}",
        )
    try:
        return json.loads(model_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{model_json} is corrupted ({e})", "re-run export/export.py") from None


def artifact_bytes(path: Path, meta: dict[str, Any]) -> int:
    """Bytes on disk: the weights file of a checkpoint, else the artifact file."""
    if artifact_kind(path) == CHECKPOINT_KIND:
        return (path / meta["weights"]["file"]).stat().st_size
    return path.stat().st_size


_COST_CACHE: dict[str, tuple[int, int]] = {}


def model_cost(spec: ModelSpec) -> tuple[int, int]:
    """``(parameters, MACs at batch 1)`` of the architecture ``spec`` describes, compression recipe applied.

    Counted on the rebuilt PyTorch module, not the artifact: an export holds the same weights (a frozen
    TorchScript or ONNX graph may fold BatchNorm, which changes the count but not the model).
    """
    key = json.dumps(spec.to_dict(), sort_keys=True)
    if key not in _COST_CACHE:
        model = apply_recipe_(create_model(spec), spec.recipe).eval()
        _COST_CACHE[key] = (count_parameters(model), count_macs(model, spec.input_size))
    return _COST_CACHE[key]


def _empty_row(target: Target) -> dict[str, Any]:
    return {
        "role": target.role,
        "model": target.path.name,
        "artifact": str(target.path),
        "runtime": target.runtime or "?",
        "status": "ok",
        "reason": None,
        "fix": None,
        "row_seconds": None,
        **dict.fromkeys(_METRICS),
    }


def _error_text(e: BaseException) -> tuple[str, str]:
    if isinstance(e, SlimforgeError):
        return e.problem, e.fix
    return f"{type(e).__name__}: {str(e).strip()[:300]}", ""


class _RowRunner:
    """Measures rows in this process or in a fresh one each; owns the temporary image files the workers read."""

    def __init__(self, cfg: BenchConfig, val: ValidationSet) -> None:
        self.cfg = cfg
        self.val = val
        self._tmp = tempfile.TemporaryDirectory(prefix="slimforge-bench-")
        self._files: dict[int, str] = {}
        self._jobs = itertools.count()

    def close(self) -> None:
        self._tmp.cleanup()

    def _images_file(self, images: torch.Tensor) -> str:
        key = id(images)  # ValidationSet caches one tensor per preprocessing, so id() identifies it
        if key not in self._files:
            path = os.path.join(self._tmp.name, f"images_{len(self._files)}.npy")
            np.save(path, images.numpy())
            self._files[key] = path
        return self._files[key]

    def _isolated(self, runtime: str, path: Path, images: torch.Tensor) -> dict[str, Any]:
        n = next(self._jobs)
        job_path = os.path.join(self._tmp.name, f"job_{n}.json")
        result_path = os.path.join(self._tmp.name, f"result_{n}.json")
        job = {
            "runtime": runtime,
            "artifact": str(path),
            "images": self._images_file(images),
            "timing": asdict(self.cfg.timing()),
            "result": result_path,
        }
        write_json(job_path, job)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "export._worker", job_path]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.cfg.row_timeout, env=env)
        except subprocess.TimeoutExpired:
            raise ExportError(
                f"measuring {path} with {runtime} took longer than {self.cfg.row_timeout:g} s", "raise --row-timeout"
            ) from None
        if proc.stderr.strip():
            logger.debug("worker stderr for %s [%s]:\n%s", path, runtime, proc.stderr.strip())
        if not os.path.isfile(result_path):
            code = proc.returncode
            how = f"exit status {code}"
            if code < 0:
                with contextlib.suppress(ValueError):
                    how = f"signal {signal.Signals(-code).name}"
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
            tail = f": {tail}" if tail else ""
            raise ExportError(
                f"the process measuring {path} with {runtime} died ({how}) without a result{tail}",
                "the runtime crashed on this artifact; run with -v for its output",
            )
        result = json.loads(Path(result_path).read_text())
        if "error" in result:
            raise ExportError(result["error"], result.get("fix") or "")
        return result

    def measure(self, target: Target, teacher_preds: np.ndarray | None) -> tuple[dict[str, Any], np.ndarray | None]:
        """One row (never raises for the artifact's own problems: they become the row's status)."""
        row = _empty_row(target)
        start = time.perf_counter()
        preds = None
        try:
            if not target.path.exists():
                with contextlib.suppress(ExportError):  # name the runtime it would have run on, if any
                    row["runtime"] = target.runtime or default_runtime(target.path)
                raise ExportError(f"artifact {str(target.path)!r} does not exist", "check the path")
            meta: dict[str, Any] | BaseException
            try:  # read first so skipped rows are named too; a broken description fails only a measured row
                meta = artifact_meta(target.path)
                spec = ModelSpec.from_dict(meta["model"])
                row["model"] = spec.name
            except Exception as e:
                meta = e
            if target.skip:
                row.update(status="skipped", reason=target.skip)
                return row, None
            name = target.runtime or default_runtime(target.path)
            cls = runtime_class(name)
            row.update(runtime=name, device=cls.device)
            ok, why = cls.available()
            if not ok:
                row.update(status="skipped", reason=why)
                return row, None
            if isinstance(meta, BaseException):
                raise meta
            images = self.val.images_for(spec)  # [N, C, H, W]
            if self.cfg.isolate:
                result = self._isolated(name, target.path, images)
            else:
                result = measure_artifact(name, target.path, images.numpy(), self.cfg.timing())
            preds = np.asarray(result["preds"])
            reference = preds if teacher_preds is None else teacher_preds
            d = result["describe"]
            sweep = result["throughput"]
            row.update(
                precision=d["precision"],
                compute_ops=d["compute_ops"],
                device=d["device"],
                threads=d["threads"],
                runtime_details=d["details"],
                num_images=len(preds),
                accuracy=float((preds == self.val.labels.numpy()).mean()),
                agreement=float((preds == reference).mean()),
                latency_ms=result["latency_ms"],
                throughput=sweep,
                throughput_at_max_batch=max(sweep, key=lambda s: s["batch_size"])["images_per_s"],
                best_throughput=dict(max(sweep, key=lambda s: s["images_per_s"])),
                memory=result["memory"],
                load_seconds=result["load_seconds"],
                first_run_seconds=result["first_run_seconds"],
                size_bytes=artifact_bytes(target.path, meta),
            )
            row["params"], row["macs"] = model_cost(spec)
        except Exception as e:  # one broken artifact must not cost the whole report
            logger.debug("benchmark of %s failed", target.path, exc_info=True)
            problem, fix = _error_text(e)
            logger.error("benchmark of %s [%s] failed: %s", target.path, row["runtime"], problem)
            # Half-filled numbers from before the failure would read as measurements: keep only identity fields.
            row.update(dict.fromkeys(_METRICS), status="error", reason=problem, fix=fix or None)
            preds = None
        finally:
            row["row_seconds"] = round(time.perf_counter() - start, 2)
        return row, preds


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


def recommend(rows: list[dict[str, Any]], budget: float) -> dict[str, Any] | None:
    """The fastest measured row (batch-1 p50) whose accuracy is at least the teacher's minus ``budget``.

    Ties go to the smaller artifact. The teacher itself is a candidate, so there is always an answer while the
    teacher was measured.

    Args:
        rows: Report rows; the teacher is the first ``role == "teacher"`` row with ``status == "ok"``.
        budget: Accuracy points (as a fraction) a student may lose, e.g. 0.01.

    Returns:
        ``{"row", "artifact", "runtime", "model", "precision", "p50_ms", "accuracy", "accuracy_floor", "budget",
        "candidates", "reason"}``, or ``None`` without a measured teacher.
    """
    teacher = next((r for r in rows if r["role"] == "teacher" and r["status"] == "ok"), None)
    if teacher is None or teacher.get("accuracy") is None:
        return None
    floor = teacher["accuracy"] - budget
    within = [
        (i, r)
        for i, r in enumerate(rows)
        if r["status"] == "ok"
        and r.get("latency_ms")
        and r.get("accuracy") is not None
        # accuracies are ratios of image counts: a tolerance keeps 0.99 - 0.01 from excluding 0.98
        and r["accuracy"] >= floor - 1e-9
    ]
    i, best = min(within, key=lambda ir: (ir[1]["latency_ms"]["p50"], ir[1].get("size_bytes") or 0))
    return {
        "row": i,
        "artifact": best["artifact"],
        "runtime": best["runtime"],
        "model": best["model"],
        "precision": best["precision"],
        "p50_ms": best["latency_ms"]["p50"],
        "accuracy": best["accuracy"],
        "accuracy_floor": floor,
        "budget": budget,
        "candidates": len(within),
        "reason": (
            f"fastest batch-1 p50 ({best['latency_ms']['p50']:.3f} ms) of the {len(within)} measured rows with "
            f"accuracy >= teacher {teacher['accuracy']:.4f} - budget {budget:g} = {floor:.4f}"
        ),
    }


def finish_rows(rows: list[dict[str, Any]], peaks: dict[str, Any] | None) -> None:
    """Fills the cross-row numbers in place: speedup over the teacher, fraction of peak, Pareto membership."""
    teacher = rows[0]
    t_p50 = teacher["latency_ms"]["p50"] if teacher.get("latency_ms") else None
    measured = [r for r in rows if r["status"] == "ok" and r.get("latency_ms") and r.get("accuracy") is not None]
    front = pareto_front([(r["latency_ms"]["p50"], r["accuracy"]) for r in measured])
    for r, on_front in zip(measured, front):
        r["pareto"] = on_front
    for r in rows:
        if r["status"] != "ok" or not r.get("latency_ms"):
            continue
        if t_p50:
            r["speedup_p50"] = t_p50 / r["latency_ms"]["p50"]
        key = peak_key(r["precision"], r["compute_ops"])
        r["peak_precision"] = key
        device_peaks = (peaks or {}).get(r["device"]) or {}
        peak = (device_peaks.get(key) or {}).get("ops_per_s") if key else None
        r["peak_ops_per_s"] = peak
        best = r.get("best_throughput") or {}
        r["achieved_ops_per_s"], r["fraction_of_peak"] = fraction_of_peak(r["macs"], best.get("images_per_s"), peak)


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
        SlimforgeError: the options are invalid or the teacher or its data cannot be loaded or run.
    """
    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, fix="fix the benchmark options")
    cfg = replace(cfg, threads=cfg.threads or default_threads())
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    t_target = parse_target(str(teacher), "teacher")
    t_target.runtime = t_target.runtime or TEACHER_RUNTIME
    meta = read_meta(t_target.path)
    val = ValidationSet(data_config_from_meta(meta, cfg.data_overrides, where=str(t_target.path)), cfg.max_images)
    runtime_class(t_target.runtime)  # an unknown teacher runtime is a usage error, not a row

    machine = machine_fingerprint(threads=cfg.threads)
    if machine["load_avg_1m"] is not None and machine["load_avg_1m"] > 0.5 * machine["usable_cores"]:
        logger.warning(
            "the machine is busy (load average %.1f on %d cores): latencies will be noisy",
            machine["load_avg_1m"],
            machine["usable_cores"],
        )
    plan = plan_rows(students, cfg.runtimes)
    runner = _RowRunner(cfg, val)
    peaks = None
    try:
        with _progress(len(plan) + 1 + (cfg.peak_seconds > 0), cfg.progress) as bar:
            if cfg.peak_seconds > 0:
                bar.set_postfix_str("matmul peak")
                peaks = measure_peaks(cfg.threads, cfg.peak_seconds, cpu_size=cfg.peak_size)
                bar.update()
            bar.set_postfix_str(f"teacher [{t_target.runtime}]")
            t_row, t_preds = runner.measure(t_target, None)
            bar.update()
            if t_row["status"] != "ok":
                raise ExportError(f"the teacher cannot be benchmarked: {t_row['reason']}", t_row["fix"] or "")
            rows = [t_row]
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
        "data": {**asdict(val.cfg), "num_images": len(val)},
        "teacher": str(t_target.path),
        "peaks": peaks,
        "rows": rows,
        "recommendation": recommend(rows, cfg.accuracy_budget),
        "not_selected": not_selected,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def write_benchmark(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes ``benchmark.json``, ``.csv``, ``.md`` and the self-contained ``benchmark.html`` into ``out_dir``.

    Returns:
        ``{"json": path, "csv": path, "md": path, "html": path}``.
    """
    from export.report import csv_table, markdown_table, write_text
    from export.report_html import html_report

    out = Path(out_dir)
    return {
        "json": write_json(out / "benchmark.json", report),
        "csv": write_text(out / "benchmark.csv", csv_table(report)),
        "md": write_text(out / "benchmark.md", markdown_table(report)),
        "html": write_text(out / "benchmark.html", html_report(report)),
    }
