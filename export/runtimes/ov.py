"""OpenVINO on the CPU: its own precision choice (bf16 where the CPU has it), or FP32 pinned."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, ClassVar

import numpy as np

from slimforge.export.runtimes.base import Runtime, checked_onnx, precision_from_ops, register_runtime
from slimforge.train.errors import ExportError, SlimforgeError

_OV_FIX = "install OpenVINO: pip install openvino"


def _ov_error(e: BaseException) -> str:
    """``Type: message`` on one line of at most 300 characters, without OpenVINO's source-location frames."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    # OpenVINO stacks "Exception from <file>:<line>:" and "Check '...' failed at <file>" frames above its message.
    message = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    text = " ".join(message[:2]) if message else (lines[0] if lines else "")
    return f"{type(e).__name__}: {text}"[:300]


def import_openvino():
    """``openvino``, or an ExportError naming the package to install."""
    try:
        import openvino
    except ImportError as e:
        raise ExportError(f"openvino cannot be imported ({e})", _OV_FIX) from None
    return openvino


_OV_PRECISION = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "i8": "int8", "u8": "int8", "f64": "fp64"}
_OV_COMPUTE_LAYERS = {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul", "Gemm"}


def ov_compute_ops(compiled) -> dict[str, int]:
    """Convolution / matmul layers of an OpenVINO compiled model per runtime precision (its execution graph)."""
    counts: Counter = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in _OV_COMPUTE_LAYERS:
            raw = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "unknown"
            counts[_OV_PRECISION.get(raw, raw)] += 1
    return dict(counts)


@register_runtime("openvino", kinds=(".onnx", ".xml"))
class OpenVino(Runtime):
    """OpenVINO on the CPU, reading the ``.onnx`` directly; it picks the precision (bf16 on CPUs that have it)."""

    hint: ClassVar[str | None] = None
    """``INFERENCE_PRECISION_HINT`` to pin; ``None`` leaves OpenVINO's default."""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            ov = import_openvino()
        except SlimforgeError as e:
            return False, e.problem
        if "CPU" not in ov.Core().available_devices:
            return False, "OpenVINO sees no CPU device"
        return True, ""

    def load(self, path: str | os.PathLike) -> None:
        ov = import_openvino()
        path = checked_onnx(path)
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
        if self.hint:
            config["INFERENCE_PRECISION_HINT"] = self.hint
        try:
            core = ov.Core()
            model = core.read_model(str(path))
            if len(model.inputs) != 1:
                raise ValueError(f"{len(model.inputs)} inputs, expected one image input")
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError / its own types for unreadable graphs
            raise ExportError(
                f"cannot load artifact {path} in OpenVINO: {_ov_error(e)}", "re-export it with export/export.py"
            ) from None
        self.request = self.compiled.create_infer_request()
        self._shape = [d.get_length() if d.is_static else None for d in model.inputs[0].get_partial_shape()]
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.details.update(
            inference_precision_hint=hint,
            performance_hint=str(self.compiled.get_property("PERFORMANCE_HINT")),
            num_streams=int(self.compiled.get_property("NUM_STREAMS")),
            inference_num_threads=int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
        )
        # The hint is a ceiling, not a fact: quantised layers run int8, unsupported ones stay fp32. The execution
        # graph says what each layer really computes in.
        self.compute_ops = ov_compute_ops(self.compiled) or None
        self.precision = precision_from_ops(self.compute_ops) if self.compute_ops else _OV_PRECISION.get(hint, hint)

    def input_shape(self) -> list[int | None] | None:
        return self._shape

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        # share_inputs: no copy of the host batch into OpenVINO's tensor (ORT and torch read it in place too).
        self.request.infer({0: inputs}, share_inputs=True, share_outputs=True)
        return self.request.get_output_tensor(0).data  # a view of OpenVINO's buffer; to_numpy copies it

    def to_numpy(self, outputs: np.ndarray) -> np.ndarray:
        return np.array(outputs, dtype=np.float32, copy=True)


@register_runtime("openvino-fp32", kinds=(".onnx", ".xml"), opt_in=True)
class OpenVinoFp32(OpenVino):
    """OpenVINO on the CPU with ``INFERENCE_PRECISION_HINT=f32``: what it runs at without bf16."""

    hint: ClassVar[str | None] = "f32"
