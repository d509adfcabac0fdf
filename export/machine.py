"""The machine a measurement ran on: usable cores, CPU features, memory, GPU and driver, library versions, load.

A latency number means little without these, so every report carries :func:`machine_fingerprint`, and the
runtimes ask :func:`cpu_has_bf16` whether bf16 is native here.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def default_threads() -> int:
    """CPU cores this process may use (respects taskset / cgroup affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where the OS does not say)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """x86 AVX512-BF16 / AMX-BF16, or Arm BF16: bf16 matmuls run in hardware rather than emulated."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that produce or run artifacts (``None`` when not installed)."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    versions.update({dist: version(dist) for dist in ("numpy", "onnx", "timm", "openvino")})
    # onnxruntime and onnxruntime-gpu ship the same module; say which one is installed.
    ort = [f"{v} ({dist})" for dist in ("onnxruntime-gpu", "onnxruntime") if (v := version(dist))]
    versions["onnxruntime"] = ", ".join(ort) or None
    return versions


def _gpu() -> dict[str, Any]:
    # Asked of nvidia-smi, not of torch: the benchmark's own process must not create a CUDA context (it would hold
    # GPU memory while the rows are measured in their own processes).
    if not torch.cuda.is_available():
        return {"gpu": None, "gpu_driver": None, "cuda": torch.version.cuda}
    gpus: list[list[str]] = []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0:
            gpus = [[x.strip() for x in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        pass
    name, mem, driver = gpus[0] if gpus and len(gpus[0]) == 3 else (None, None, None)
    return {
        "gpu": name or "unknown (nvidia-smi unavailable)",
        "gpu_count": len(gpus) or torch.cuda.device_count(),
        "gpu_memory_gb": round(float(mem) / 1024, 1) if mem and mem.replace(".", "").isdigit() else None,
        "gpu_driver": driver,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the OS has none)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


def machine_fingerprint(threads: int | None = None) -> dict[str, Any]:
    """What a latency number depends on: CPU model, cores and the features that pick kernels, the threads the
    benchmark used, memory, GPU and driver, library versions, and the load average when it started."""
    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": default_threads(),
        "threads": threads,
        "cpu_features": [f for f in _FLAGS if f in flags] or None,
        "memory_gb": _memory_gb(),
        "platform": platform.platform(),
        # Other processes' load makes latencies noisy: record it next to the numbers it affects.
        "load_avg_1m": load_average(),
    }
    info.update(_gpu())
    info.update(library_versions())
    return info
