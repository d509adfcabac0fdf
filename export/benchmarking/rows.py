"""Measuring one row: the artifact's description, size and cost, and the runner that times it in a fresh
process (or in this one) through :func:`slimforge.export.measure.measure_artifact`."""

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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimforge.compress.api import method_class
from slimforge.compress.stats import count_macs, count_parameters
from slimforge.export.benchmarking.config import BenchConfig
from slimforge.export.benchmarking.plan import Target
from slimforge.export.description import artifact_meta
from slimforge.export.evaldata import ValidationSet
from slimforge.export.measure import measure_artifact
from slimforge.export.peak import measure_peaks
from slimforge.export.report import write_json
from slimforge.export.runtimes import CHECKPOINT_KIND, artifact_kind, default_runtime, runtime_class
from slimforge.train.checkpoint import rebuild_model, spec_from_meta
from slimforge.train.errors import ExportError, SlimforgeError, first_line
from slimforge.train.models import ModelSpec

logger = logging.getLogger(__name__)

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
    "speedup_vs",
    "achieved_ops_per_s",
    "peak_precision",
    "peak_ops_per_s",
    "fraction_of_peak",
    "pareto",
    "load_seconds",
    "first_run_seconds",
    "runtime_details",
    "int8_mac_fraction",
    "notes",
)


def artifact_bytes(path: Path, meta: dict[str, Any]) -> int:
    """Bytes on disk: the weights file of a checkpoint, else the artifact file."""
    if artifact_kind(path) == CHECKPOINT_KIND:
        return (path / meta["weights"]["file"]).stat().st_size
    return path.stat().st_size


_COST_CACHE: dict[str, tuple[int, int]] = {}


def model_cost(spec: ModelSpec, allow_factory: bool = False) -> tuple[int, int]:
    """``(parameters, MACs at batch 1)`` of the architecture ``spec`` describes, compression recipe applied.

    Counted on the rebuilt PyTorch module, not the artifact: an export holds the same weights (a frozen
    TorchScript or ONNX graph may fold BatchNorm, which changes the count but not the model). A user-factory model
    is rebuilt only with ``allow_factory``.
    """
    key = json.dumps(spec.to_dict(), sort_keys=True)
    if key not in _COST_CACHE:
        model = rebuild_model(spec, allow_factory=allow_factory, opt_in="pass --allow-factory").eval()
        _COST_CACHE[key] = (count_parameters(model), count_macs(model, spec.input_size))
    return _COST_CACHE[key]


def model_label(spec: ModelSpec) -> str:
    """The architecture's name and the structural steps of its recipe (``resnet10t+prune``), so a pruned or
    factorised student's rows are told apart from the unpruned one's; quantisation shows as the row's precision."""
    structural = [
        s.get("method") for s in spec.recipe if not getattr(method_class(s.get("method")), "quantizes", False)
    ]
    return "+".join([spec.name, *structural])


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
    return first_line(e), ""


class RowRunner:
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

    def peaks(self, threads: int) -> dict[str, Any]:
        """The matmul peaks (:func:`slimforge.export.peak.measure_peaks`), in a fresh process when rows are isolated:
        on a GPU machine the benchmark's own process then never holds the GPU while a row is measured."""
        args = {"threads": threads, "seconds": self.cfg.peak_seconds, "cpu_size": self.cfg.peak_size}
        if not self.cfg.isolate:
            return measure_peaks(**args)
        return self._run_job({"kind": "peaks", "peaks": args}, "the matmul peak", "its kernels")

    def _isolated(self, runtime: str, path: Path, images: torch.Tensor) -> dict[str, Any]:
        job = {
            "runtime": runtime,
            "artifact": str(path),
            "images": self._images_file(images),
            "timing": asdict(self.cfg.timing),
            "allow_factory": self.cfg.allow_factory,
        }
        return self._run_job(job, str(path), runtime)

    def _run_job(self, job: dict[str, Any], path: str, runtime: str) -> dict[str, Any]:
        n = next(self._jobs)
        job_path = os.path.join(self._tmp.name, f"job_{n}.json")
        result_path = os.path.join(self._tmp.name, f"result_{n}.json")
        job["result"] = result_path
        write_json(job_path, job)
        cmd = [sys.executable, "-m", "slimforge.export._worker", job_path]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.cfg.row_timeout)
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
                spec = spec_from_meta(meta, str(target.path))
                row["model"] = model_label(spec)
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
                result = measure_artifact(name, target.path, images.numpy(), self.cfg.timing, self.cfg.allow_factory)
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
                int8_mac_fraction=d["details"].get("int8_mac_fraction"),
                notes=[d["details"]["fallback"]] if d["details"].get("fallback") else None,
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
            row["params"], row["macs"] = model_cost(spec, self.cfg.allow_factory)
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
