"""One benchmark row: load an artifact in a runtime, predict the validation images, time it, watch its memory.

:func:`measure_artifact` is what every row of the benchmark runs, in the benchmark's process or — by default —
in a fresh one (:mod:`slimforge.export._worker`), so each row's peak memory is its own and a runtime that crashes takes
only its row down. It knows nothing about teachers or reports: it returns predictions and raw timings, and
:mod:`slimforge.export.benchmarking` turns them into accuracy, agreement, speedups and fractions of peak.

Timing: every call returns only once its logits are ready (:meth:`Runtime.forward`); ``warmup`` untimed calls
precede each timed series. Batch-1 latency is timed in ``rounds`` rounds of single calls on one real image; each
round makes at least ``runs / rounds`` calls *and* lasts at least ``min_round_s`` (as ``torch.utils.benchmark``'s
``blocked_autorange`` sets a minimum run time), so a sub-millisecond model is not timed over a few tens of
milliseconds that one change of the CPU's speed state can move. The p50 is the median of the rounds' medians (a
round caught in a slow state moves it less than pooling every call would); p90/p99/mean/min are over every call;
``spread`` = (slowest − fastest round median) / p50 says how much the machine moved during the row, and a spread
above ``unstable_spread`` marks the row unstable in the report. Throughput is at least ``throughput_runs`` calls
and ``min_round_s`` per batch size of the sweep (real images, repeated when the sweep asks for more).

Memory: the peak resident set (``VmHWM``) is reset just before the artifact is loaded (``/proc/self/clear_refs``,
Linux) and read after the last timed call, so ``rss_increase_mb`` is what loading, compiling and running this
artifact at every batch size of the sweep added to a process that already held Python, the libraries and the
images. Where the reset is refused, the process's lifetime peak is reported instead and the method says so.
On a GPU, PyTorch runtimes also report ``torch.cuda.max_memory_allocated``.

Example:
    >>> from slimforge.export.measure import TimingConfig, measure_artifact
    >>> result = measure_artifact("ort-cpu", "out/model.onnx", images, TimingConfig(runs=200))  # doctest: +SKIP
    >>> result["latency_ms"]["p50"]  # doctest: +SKIP
    0.41
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimforge.export.runtimes import Runtime, get_runtime
from slimforge.export.verify import run_batches
from slimforge.train.config import at_least
from slimforge.train.errors import ExportError, first_line

logger = logging.getLogger(__name__)


@dataclass
class TimingConfig:
    """How one row is timed (the ``timing`` part of :class:`slimforge.export.benchmarking.BenchConfig`)."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    """Throughput sweep."""
    runs: int = 200
    """Timed batch-1 runs for the latency percentiles, at least (split across ``rounds``)."""
    rounds: int = 5
    """Rounds of the batch-1 series; their medians give the p50 and the spread."""
    min_round_s: float = 0.4
    """Each round (and each batch size of the sweep) keeps calling until it has lasted this long."""
    unstable_spread: float = 0.10
    """A row whose round medians differ by more than this fraction of its p50 is flagged unstable."""
    warmup: int = 10
    """Untimed runs before each timed series (allocator, kernel selection, caches)."""
    throughput_runs: int = 20
    """Timed runs per batch size of the sweep."""
    threads: int | None = None
    """Intra-op CPU threads of every runtime (and of the peak measurement); ``None``: all usable cores."""
    eval_batch_size: int = 32
    """Batch size of the accuracy pass."""
    tf32: bool = True
    """NVIDIA GPUs: FP32 convolutions/matmuls on TF32 tensor cores (PyTorch, ONNX Runtime CUDA), set explicitly in
    every GPU runtime; such rows report precision ``tf32`` and are judged against the TF32 peak. False: strict FP32
    (TensorRT keeps its own default, TF32 allowed, and says so)."""

    def validate(self) -> list[str]:
        p = [] if self.batch_sizes else ["batch_sizes: name at least one batch size"]
        p += [f"batch_sizes: {b} must be >= 1" for b in self.batch_sizes if b < 1]
        p += at_least(self, 1, "runs", "rounds", "throughput_runs", "eval_batch_size", "threads")
        p += at_least(self, 0, "warmup", "min_round_s")
        if self.unstable_spread <= 0:
            p.append(f"unstable_spread: {self.unstable_spread} must be > 0 (0.10 = 10% of the p50)")
        return p


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class MemoryProbe:
    """Peak resident memory (and PyTorch GPU memory) of this process over a stretch of work.

    Args:
        device: The runtime's device; ``"cuda"`` also tracks ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.rss_before_kb: int | None = None
        self.reset = False

    def start(self) -> None:
        self.rss_before_kb = _status_kb("VmRSS")
        try:
            # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0, documented in proc(5)).
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = _status_kb("VmHWM") is not None
        except OSError:
            self.reset = False
        if self.device == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rss_before_mb": _mb(self.rss_before_kb)}
        if self.reset:
            peak = _status_kb("VmHWM")
            out["method"] = "VmHWM reset before load, read after the last timed call"
            out["peak_rss_mb"] = _mb(peak)
            out["rss_increase_mb"] = _mb(peak - self.rss_before_kb) if peak and self.rss_before_kb else None
        else:
            # ru_maxrss is in KiB on Linux: the whole process's peak, which may predate this row.
            out["method"] = "ru_maxrss (process lifetime peak: VmHWM reset unavailable)"
            out["peak_rss_mb"] = _mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            out["rss_increase_mb"] = None
        out["gpu_peak_mb"] = None
        if self.device == "cuda" and torch.cuda.is_available():
            # Counts PyTorch's allocator only: ONNX Runtime's CUDA arena is invisible to it.
            out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out


def _mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024


def time_forward(runtime: Runtime, batch: np.ndarray, runs: int, warmup: int, min_time_s: float = 0.0) -> np.ndarray:
    """Wall-clock seconds of forward calls on one prepared batch ``[B, C, H, W]``: at least ``runs`` calls, and
    more until the series has lasted ``min_time_s``.

    Returns:
        ``[n]`` seconds, one per call (each call returns only once its result is ready), ``n >= runs``.
    """
    return _timed_calls(runtime, _warm(runtime, batch, warmup), runs, min_time_s)


def _warm(runtime: Runtime, batch: np.ndarray, warmup: int) -> Any:
    """The runtime's native input for ``batch`` after ``warmup`` untimed calls on it."""
    inputs = runtime.prepare(np.ascontiguousarray(batch, dtype=np.float32))
    for _ in range(warmup):
        runtime.forward(inputs)
    return inputs


def _timed_calls(runtime: Runtime, inputs: Any, runs: int, min_time_s: float) -> np.ndarray:
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < runs or time.perf_counter() - begin < min_time_s:
        start = time.perf_counter()
        runtime.forward(inputs)
        times.append(time.perf_counter() - start)
    return np.asarray(times)


def latency_rounds(runtime: Runtime, image: np.ndarray, cfg: TimingConfig) -> list[np.ndarray]:
    """Batch-1 latency in ``cfg.rounds`` consecutive rounds after one warm-up: seconds per call, one array each."""
    inputs = _warm(runtime, image, cfg.warmup)
    per_round = -(-cfg.runs // cfg.rounds)  # ceil: at least `runs` calls in all
    return [_timed_calls(runtime, inputs, per_round, cfg.min_round_s) for _ in range(cfg.rounds)]


def latency_stats(rounds_ms: list[np.ndarray], unstable_spread: float) -> dict[str, Any]:
    """The report's batch-1 latency entry from per-round call times in ms (see the module docstring)."""
    every = np.concatenate(rounds_ms)
    medians = [float(np.median(r)) for r in rounds_ms]
    p50 = float(np.median(medians))
    spread = (max(medians) - min(medians)) / p50 if p50 > 0 else 0.0
    return {
        "batch_size": 1,
        "runs": len(every),
        "rounds": len(rounds_ms),
        "round_p50": medians,
        "p50": p50,
        "p90": float(np.percentile(every, 90)),
        "p99": float(np.percentile(every, 99)),
        "mean": float(every.mean()),
        "min": float(every.min()),
        "std": float(every.std()),
        "seconds": float(every.sum() / 1e3),
        "spread": spread,
        "stable": spread <= unstable_spread,
    }


def _shape_text(shape: list[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def check_input_shape(declared: list[int | None] | None, images_shape: tuple[int, ...], artifact: str) -> None:
    """Refuses an artifact whose declared input cannot take the benchmark's images before anything runs.

    Args:
        declared: The runtime's :meth:`Runtime.input_shape` (``None`` entries are dynamic); ``None``: unknown.
        images_shape: ``[N, C, H, W]`` of the images the benchmark feeds (from the artifact's model.json).
        artifact: Path for the message.

    Raises:
        ExportError: the rank, channels or image size differ, or the batch axis is fixed.
    """
    if declared is None:
        return
    want = [None, *images_shape[1:]]
    if len(declared) != len(want) or any(d is not None and d != w for d, w in zip(declared[1:], want[1:])):
        raise ExportError(
            f"{artifact} takes input {_shape_text(declared)}, but its model.json describes images "
            f"{_shape_text(want)} (batch, channels, height, width)",
            "benchmark the artifact next to the model.json of the model it was exported from "
            "(export/export.py writes both)",
        )
    if declared[0] is not None:
        raise ExportError(
            f"{artifact} has its batch axis fixed at {declared[0]}; the benchmark runs batches of several sizes",
            "re-export it with a dynamic batch axis (export/export.py does)",
        )


def _batch(images: np.ndarray, size: int) -> np.ndarray:
    # Real images, repeated when the sweep asks for more than the validation set holds.
    return images[np.arange(size) % len(images)]


def measure_artifact(
    runtime: str, artifact: str | os.PathLike, images: np.ndarray, cfg: TimingConfig, allow_factory: bool = False
) -> dict:
    """Loads ``artifact`` in ``runtime``, predicts ``images`` and times it.

    Args:
        runtime: A registered runtime name, available here.
        artifact: The checkpoint directory or file.
        images: ``[N, C, H, W]`` float32 validation images preprocessed for this model.
        cfg: Threads, runs and batch sizes.
        allow_factory: Load a user-factory checkpoint (imports and runs the code its metadata names).

    Returns:
        ``describe`` (the runtime's own account: precision, compute ops, details), ``preds`` ``[N]`` top-1
        classes, ``latency_ms`` (batch 1: :func:`latency_stats`), ``throughput`` (one entry per batch size),
        ``load_seconds``, ``first_run_seconds`` (compilation / allocation on the first batch-1 call) and
        ``memory`` (see :class:`MemoryProbe`).

    Raises:
        ExportError: the runtime is unavailable or the artifact cannot be loaded or run.
    """
    cls = get_runtime(runtime)
    images = np.ascontiguousarray(images, dtype=np.float32)
    probe = MemoryProbe(cls.device)
    probe.start()
    max_batch = max([*cfg.batch_sizes, min(cfg.eval_batch_size, len(images))])
    rt = cls(threads=cfg.threads, allow_factory=allow_factory, tf32=cfg.tf32, max_batch=max_batch)
    start = time.perf_counter()
    rt.load(artifact)
    load_seconds = time.perf_counter() - start
    check_input_shape(rt.input_shape(), images.shape, str(artifact))

    start = time.perf_counter()
    run_batches(rt, torch.from_numpy(images[:1]), [1])
    first_run_seconds = time.perf_counter() - start
    n, bs = len(images), cfg.eval_batch_size
    logits = run_batches(rt, torch.from_numpy(images), [min(bs, n - i) for i in range(0, n, bs)])  # [N, K]

    latency = latency_stats([r * 1e3 for r in latency_rounds(rt, images[:1], cfg)], cfg.unstable_spread)
    sweep = []
    for size in cfg.batch_sizes:
        try:
            t = time_forward(rt, _batch(images, size), cfg.throughput_runs, cfg.warmup, cfg.min_round_s)
        except Exception as e:  # e.g. out of memory at a large batch: name the size that failed
            raise ExportError(
                f"runtime {runtime} failed at batch size {size}: {first_line(e, 200)}",
                "drop that size from --batch-sizes",
            ) from None
        sweep.append({"batch_size": size, "images_per_s": size * len(t) / t.sum(), "ms_per_batch": 1e3 * t.mean()})
    return {
        "describe": rt.describe(),
        "preds": logits.argmax(1).tolist(),
        "latency_ms": latency,
        "throughput": sweep,
        "load_seconds": load_seconds,
        "first_run_seconds": first_run_seconds,
        "memory": probe.stop(),
    }
