"""ONNX Runtime: the CPU, CUDA and TensorRT execution providers, and the one session-options builder every
ONNX Runtime session in slimforge uses."""

from __future__ import annotations

import ctypes.util
import logging
import os
import tempfile
from typing import ClassVar

import numpy as np

from slimforge.export.onnx_graph import int8_macs, onnx_precision, ort_compute_ops
from slimforge.export.runtimes.base import (
    Runtime,
    checked_onnx,
    cuda_available,
    precision_from_ops,
    register_runtime,
)
from slimforge.train.errors import ExportError, SlimforgeError, first_line

logger = logging.getLogger(__name__)

_ORT_FIX = "install ONNX Runtime: pip install onnxruntime-gpu (Linux x86_64, also runs on CPU) or onnxruntime"


def import_onnxruntime():
    """``onnxruntime``, or an ExportError naming the package to install."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"onnxruntime cannot be imported ({e})", _ORT_FIX) from None
    return onnxruntime


def session_options(threads: int, optimize: bool = True):
    """ONNX Runtime session options as slimforge runs every session: ``threads`` intra-op threads, one inter-op
    thread (one image graph at a time: the parallelism is inside the operators), errors-only logging.

    Args:
        threads: Intra-op threads.
        optimize: ``False`` disables every graph optimisation (the graph runs exactly as written: what the
            emulated-parity check of a quantised model needs).
    """
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only; load failures surface as exceptions
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


@register_runtime("ort-cpu", default_for=(".onnx",))
class OrtCpu(Runtime):
    """ONNX Runtime on the CPUExecutionProvider. For a quantised graph it reads back which Q/DQ-wrapped operations
    became integer kernels, and which share of the multiply-accumulates they carry (``int8_mac_fraction``)."""

    providers: ClassVar[list[str]] = ["CPUExecutionProvider"]
    optimize: ClassVar[bool] = True

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import_onnxruntime()
        except SlimforgeError as e:
            return False, e.problem
        return True, ""

    def load(self, path: str | os.PathLike) -> None:
        ort = import_onnxruntime()
        path = checked_onnx(path)
        so = session_options(self.threads, optimize=self.optimize)
        try:
            declared = onnx_precision(path)
        except Exception as e:  # a corrupted protobuf: the session below names the problem the same way
            declared = "unknown"
            logger.debug("cannot read %s with onnx: %s", path, e)
        with tempfile.TemporaryDirectory() as tmp:
            if declared == "int8":
                # Which Q/DQ pairs became integer kernels is decided at session build: read back the optimised graph.
                so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
            try:
                self.session = ort.InferenceSession(str(path), so, providers=self.providers)
            except Exception as e:  # ORT raises its own pybind exception types (InvalidProtobuf, Fail, ...)
                raise ExportError(
                    f"cannot load ONNX artifact {path}: {first_line(e)}", "re-export it with export/export.py"
                ) from None
            self.precision = declared
            if declared == "int8" and os.path.isfile(so.optimized_model_filepath):
                self.compute_ops = ort_compute_ops(so.optimized_model_filepath)
                self.precision = precision_from_ops(self.compute_ops)
        used = self.session.get_providers()
        if used[0] != self.providers[0]:
            raise ExportError(
                f"ONNX Runtime fell back to {used[0]} instead of {self.providers[0]} for {path}",
                f"install the onnxruntime build and drivers for {self.providers[0]}, or use runtime ort-cpu",
            )
        self.details["providers"] = used
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise ExportError(f"ONNX artifact {path} has {len(inputs)} inputs, expected one image input", "")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self._shape = [d if isinstance(d, int) else None for d in inputs[0].shape]
        if declared == "int8" and self.optimize and self.providers[0] == "CPUExecutionProvider":
            if all(isinstance(d, int) for d in self._shape[1:]):
                report = int8_macs(path, [1, *self._shape[1:]], threads=self.threads)
                self.details["int8_mac_fraction"] = report["fraction"]
                self.details["int8_macs"] = {k: report[k] for k in ("int8_macs", "total_macs", "ops", "float_layers")}

    def input_shape(self) -> list[int | None] | None:
        return self._shape

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        # session.run is synchronous and returns host arrays, also with the CUDA provider.
        return self.session.run([self.output_name], {self.input_name: inputs})[0]


@register_runtime("ort-cpu-emulated", kinds=(".onnx",), opt_in=True)
class OrtCpuEmulated(OrtCpu):
    """ONNX Runtime on the CPU with every graph optimisation off: a QDQ graph runs exactly as written (float
    operations between QuantizeLinear/DequantizeLinear), which is what a fake-quant model emulates."""

    optimize: ClassVar[bool] = False

    def load(self, path: str | os.PathLike) -> None:
        super().load(path)
        if self.precision.startswith(("int8", "mixed")):
            self.precision = "fp32"  # Q/DQ emulated in float: no integer kernel runs
            self.details["emulates"] = "int8 (Q/DQ in float)"


@register_runtime("ort-cuda", kinds=(".onnx",))
class OrtCuda(OrtCpu):
    """ONNX Runtime on the CUDAExecutionProvider (host arrays in and out, so copies are timed too)."""

    providers: ClassVar[list[str]] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    device: ClassVar[str] = "cuda"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, why = super().available()
        if not ok:
            return ok, why
        # onnxruntime-gpu lists the CUDA provider even without a GPU; it fails to load at session time.
        ok, why = cuda_available()
        if not ok:
            return ok, why
        if cls.providers[0] not in import_onnxruntime().get_available_providers():
            return False, f"this onnxruntime build has no {cls.providers[0]}"
        return True, ""


@register_runtime("ort-tensorrt", kinds=(".onnx",))
class OrtTensorRT(OrtCuda):
    """ONNX Runtime on the TensorrtExecutionProvider (engines are built on the first run of each input shape)."""

    providers: ClassVar[list[str]] = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, why = super().available()
        if not ok:
            return ok, why
        if ctypes.util.find_library("nvinfer") is None:
            try:
                ctypes.CDLL("libnvinfer.so.10")
            except OSError:
                return False, (
                    "TensorRT's libnvinfer.so.10 is not on the library path: install TensorRT 10 for the CUDA "
                    "version of onnxruntime-gpu (e.g. pip install 'tensorrt-cu13<11') and add its library folder "
                    "(site-packages/tensorrt_libs for the pip wheel) to LD_LIBRARY_PATH"
                )
        return True, ""
