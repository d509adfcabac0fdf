"""The machine's measured matrix-multiply peak, per precision, and each runtime's fraction of it.

A datasheet peak assumes every core at full clock on every cycle; a deployed model never sees it. What a
benchmark can compare against is the fastest dense matrix multiply this machine runs with the same threads:
``size × size`` by ``size × size`` (2048 on CPU, 8192 on GPU), ``2·size³`` operations per call, timed for about
``seconds`` after two warm-up calls as five stretches of which the fastest counts (other load only slows a
stretch down). Each precision is measured with every kernel at hand and the fastest
one is the peak, with all of them recorded:

* fp32: ``torch.mm`` (PyTorch's BLAS), an ONNX Runtime ``MatMul`` (MLAS, the kernels ORT's convolutions use)
  and an OpenVINO ``MatMul`` (oneDNN) when openvino is installed;
* bf16 (only where the CPU has bf16 instructions, or on a GPU): ``torch.mm`` on bf16 tensors and OpenVINO
  ``MatMul`` compiled with ``INFERENCE_PRECISION_HINT=bf16``;
* int8: ``torch._int_mm`` and an ONNX Runtime ``MatMulInteger`` (uint8 × int8 → int32, VNNI on x86);
* GPU: ``torch.mm`` in fp32 (TF32 off), tf32, bf16, fp16 and ``torch._int_mm``.

A row's achieved rate is ``2 × MACs × images/s`` at its best batch size of the sweep; its fraction of peak is
that over the peak of the precision it computed in (:func:`peak_key`). Elementwise work is not counted in MACs,
so a fraction measures how well the runtime keeps the matrix units busy, not total work.

Example:
    >>> from slimforge.export.peak import measure_peaks, fraction_of_peak
    >>> peaks = measure_peaks(threads=2, seconds=1.0)  # doctest: +SKIP
    >>> peaks["cpu"]["fp32"]["ops_per_s"]  # doctest: +SKIP
    4.1e11
    >>> fraction_of_peak(macs=1_000_000_000, images_per_s=100.0, peak_ops_per_s=4e11)
    (200000000000.0, 0.5)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from slimforge.export.machine import cpu_has_bf16
from slimforge.export.runtimes import PRECISIONS
from slimforge.train.errors import first_line

logger = logging.getLogger(__name__)

CPU_SIZE = 2048
GPU_SIZE = 8192


def _rate(
    fn: Callable[[], Any], ops: float, seconds: float, sync: Callable[[], None] = lambda: None, trials: int = 5
) -> float:
    """Operations per second of ``fn`` (``ops`` per call): the best of ``trials`` timed stretches of about
    ``seconds / trials`` each, after two warm-up calls. Other work on the machine can only slow a stretch down,
    so the best one is the closest to what the hardware can do."""
    for _ in range(2):
        fn()
    sync()
    best = 0.0
    for _ in range(trials):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            if calls >= 2:
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= seconds / trials:
                    break
        best = max(best, ops * calls / elapsed)
    return best


def _ort_matmul(n: int, integer: bool, threads: int) -> Callable[[], Any]:
    """A one-node ONNX Runtime graph: ``A [n, n] @ B [n, n]`` with B a constant (as weights are)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from slimforge.export.runtimes.ort import session_options

    rng = np.random.default_rng(0)
    if integer:
        a = rng.integers(0, 255, (n, n), dtype=np.uint8)
        b = numpy_helper.from_array(rng.integers(-127, 127, (n, n), dtype=np.int8), "B")
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "peak",
        [helper.make_tensor_value_info("A", a_type, [n, n])],
        [helper.make_tensor_value_info("Y", y_type, [n, n])],
        [b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    so = session_options(threads)
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    onnx.checker.check_model(model)
    return lambda: session.run(None, {"A": a})


def _ov_matmul(n: int, hint: str, threads: int) -> Callable[[], Any]:
    """A one-layer OpenVINO model, ``A [n, n] @ B [n, n]`` with B a constant, compiled at precision ``hint``."""
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    a = ops.parameter([n, n], ov.Type.f32, name="A")
    model = ov.Model([ops.matmul(a, ops.constant(rng.standard_normal((n, n), dtype=np.float32)), False, False)], [a])
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    x = rng.standard_normal((n, n), dtype=np.float32)
    return lambda: request.infer({0: x}, share_inputs=True, share_outputs=True)


def _best(kernels: dict[str, Callable[[], Callable[[], Any]]], ops: float, seconds: float, sync=lambda: None):
    """Times every kernel (a factory that builds it); the fastest is the peak, a failing one is recorded."""
    rates: dict[str, float | str] = {}
    for name, build in kernels.items():
        try:
            rates[name] = _rate(build(), ops, seconds, sync)
        except Exception as e:  # a kernel this build lacks (e.g. torch._int_mm on some CPUs) is not fatal
            rates[name] = f"unavailable: {first_line(e, 200)}"
            logger.debug("peak kernel %s failed", name, exc_info=True)
    measured = {k: v for k, v in rates.items() if isinstance(v, float)}
    if not measured:
        return {"ops_per_s": None, "kernels": rates, "best": None}
    best = max(measured, key=measured.get)
    return {"ops_per_s": measured[best], "kernels": rates, "best": best}


def _has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _cpu_peaks(threads: int, seconds: float, n: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    ops = 2.0 * n**3
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    fp32 = {"torch.mm": lambda: lambda: torch.mm(a, b), "onnxruntime MatMul": lambda: _ort_matmul(n, False, threads)}
    if _has_openvino():
        fp32["openvino MatMul"] = lambda: _ov_matmul(n, "f32", threads)
    peaks: dict[str, Any] = {"fp32": _best(fp32, ops, seconds)}
    if cpu_has_bf16():
        ab, bb = a.bfloat16(), b.bfloat16()
        bf16 = {"torch.mm": lambda: lambda: torch.mm(ab, bb)}
        if _has_openvino():
            bf16["openvino MatMul"] = lambda: _ov_matmul(n, "bf16", threads)
        peaks["bf16"] = _best(bf16, ops, seconds)
    else:
        peaks["bf16"] = {"ops_per_s": None, "kernels": {}, "best": None, "skipped": "the CPU has no bf16 instructions"}
    ai = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=g)
    bi = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=g)
    peaks["int8"] = _best(
        {
            "torch._int_mm": lambda: lambda: torch._int_mm(ai, bi),
            "onnxruntime MatMulInteger": lambda: _ort_matmul(n, True, threads),
        },
        ops,
        seconds,
    )
    return peaks


def _gpu_peaks(seconds: float, n: int) -> dict[str, Any]:
    ops = 2.0 * n**3
    dev = "cuda"
    sync = torch.cuda.synchronize
    peaks: dict[str, Any] = {}
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for key, dtype, tf32 in (
            ("fp32", torch.float32, False),
            ("tf32", torch.float32, True),
            ("bf16", torch.bfloat16, False),
            ("fp16", torch.float16, False),
        ):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
            peaks[key] = _best({"torch.mm": lambda a=a, b=b: lambda: torch.mm(a, b)}, ops, seconds, sync)
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    ai = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=dev)
    bi = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=dev)
    peaks["int8"] = _best({"torch._int_mm": lambda: lambda: torch._int_mm(ai, bi)}, ops, seconds, sync)
    return peaks


def measure_peaks(threads: int, seconds: float = 1.0, cpu_size: int = CPU_SIZE, gpu_size: int = GPU_SIZE) -> dict:
    """Measures the CPU (and, when visible, GPU) matrix-multiply peak per precision.

    Args:
        threads: CPU threads, the same the benchmarked runtimes use.
        seconds: Timed seconds per kernel (after two warm-up calls).
        cpu_size: Square matrix size on the CPU.
        gpu_size: Square matrix size on the GPU.

    Returns:
        ``{"method": str, "threads", "seconds", "cpu": {precision: {"ops_per_s", "kernels", "best"}}, "cuda": ...}``;
        ``ops_per_s`` is ``None`` for a precision no kernel could run.
    """
    start = time.perf_counter()
    out: dict[str, Any] = {
        "method": "fastest square matrix multiply per precision, 2*n^3 operations per call, same CPU threads as "
        "the runtimes; see export/peak.py",
        "threads": threads,
        "seconds_per_kernel": seconds,
        "cpu_size": cpu_size,
        "cpu": _cpu_peaks(threads, seconds, cpu_size),
    }
    if torch.cuda.is_available():
        out["gpu_size"] = gpu_size
        out["cuda"] = _gpu_peaks(seconds, gpu_size)
    out["wall_seconds"] = round(time.perf_counter() - start, 2)
    return out


def peak_key(precision: str | None, compute_ops: dict[str, int] | None = None) -> str | None:
    """The precision whose peak a row is judged against.

    The one it spent most of its convolution/matmul kernels in when the runtime reports counts; otherwise the
    plain precision name, and for ``mixed(a,b)`` the least precise (fastest) of them, so the fraction is never
    flattered by a slower peak.
    """
    if compute_ops:
        counted = {k: v for k, v in compute_ops.items() if v and k in PRECISIONS}
        if counted:
            return max(counted, key=lambda k: (counted[k], PRECISIONS.index(k)))
    if not precision:
        return None
    if precision.startswith("mixed(") and precision.endswith(")"):
        names = [part.split(":")[0] for part in precision[6:-1].split(",")]
        known = [n for n in names if n in PRECISIONS]
        return max(known, key=PRECISIONS.index) if known else None
    return precision if precision in PRECISIONS else None


def fraction_of_peak(macs: int | None, images_per_s: float | None, peak_ops_per_s: float | None):
    """``(achieved operations/s, fraction of peak)``: ``2 × macs × images_per_s`` and that over the peak.

    Either is ``None`` when an input is missing (no MACs, no throughput, or no peak for that precision).
    """
    if not macs or not images_per_s:
        return None, None
    achieved = 2.0 * macs * images_per_s
    return achieved, (achieved / peak_ops_per_s if peak_ops_per_s else None)
