"""Int8 post-training quantisation of an ONNX graph with ONNX Runtime's own tools (``quantize_static``,
``quantize_dynamic``): the reference slimforge's own QDQ export (:mod:`slimforge.compress.quantize`) is measured
against.

The FP32 graph (:func:`slimforge.export.to_onnx.export_onnx`) gets QuantizeLinear/DequantizeLinear pairs around every
convolution and matmul (QDQ format), weights quantised per output channel (int8, symmetric) and activations
per tensor, their ranges calibrated (MinMax) on real training images of the checkpoint's dataset. ONNX Runtime
fuses each Q/DQ-wrapped convolution into an integer kernel when the whole pattern fits; the benchmark reads back
how many did (``ort-cpu`` precision ``int8`` or ``mixed(int8:…,fp32:…)``).

Activations default to uint8 (U8S8): on x86 that is the pattern ORT's integer convolutions take everywhere,
while int8 activations (S8S8) left a third of ResNet's convolutions in FP32 in our measurement (see
docs/benchmark.md).

Int8 does not reproduce FP32 logits to 1e-4, so the export's parity check for this format judges top-1
agreement with the FP32 model only (``ExportConfig.int8_parity``).

Example:
    >>> from slimforge.export.to_onnx_int8 import quantize_onnx_int8
    >>> quantize_onnx_int8("out/fp32.onnx", "out/model.int8.onnx", calibration)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from slimforge.train.errors import ExportError, first_line

logger = logging.getLogger(__name__)

ACTIVATION_TYPES = ("uint8", "int8")


class _DropPreprocessHint(logging.Filter):
    # quantize_static logs a hint to run its shape-inference pre-processing first, twice, on the root logger.
    # The dynamo exporter's graph already carries shapes; pre-processing ResNet-50 changed its int8 latency by
    # under 2% here (32.2 vs 32.6 ms), so it is not run and the hint is dropped.
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_onnx_int8(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration: np.ndarray,
    batch_size: int = 16,
    activations: str = "uint8",
    per_channel: bool = True,
    method: str = "minmax",
) -> Path:
    """Writes the QDQ int8 version of an FP32 ONNX graph.

    Args:
        fp32_path: The FP32 graph (one image input).
        out_path: Output file.
        calibration: ``[N, C, H, W]`` float32 images, preprocessed as the model expects.
        batch_size: Images per calibration batch.
        activations: ``"uint8"`` (U8S8) or ``"int8"`` (S8S8).
        per_channel: Quantise weights per output channel (else per tensor).
        method: ORT's calibration method: ``minmax``, ``percentile`` or ``entropy``.

    Raises:
        ExportError: onnxruntime's quantisation tools are missing or quantisation fails.
    """
    if activations not in ACTIVATION_TYPES:
        raise ExportError(f"int8 activations {activations!r} unknown", f"choose one of {', '.join(ACTIVATION_TYPES)}")
    if len(calibration) == 0:
        raise ExportError("no calibration images for int8 quantisation", "use a dataset with training images")
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError as e:
        raise ExportError(
            f"onnxruntime.quantization cannot be imported ({e})", "pip install onnxruntime-gpu (or onnxruntime) onnx"
        ) from None

    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    data = np.ascontiguousarray(calibration, dtype=np.float32)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(range(0, len(data), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self._batches, None)
            return None if start is None else {input_name: data[start : start + batch_size]}

    out_path = Path(out_path)
    hint = _DropPreprocessHint()
    logging.getLogger().addFilter(hint)
    try:
        quantize_static(
            str(fp32_path),
            str(out_path),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }[method],
        )
    except Exception as e:  # onnxruntime.quantization raises plain exceptions of many types
        logger.debug("quantize_static traceback", exc_info=True)
        raise ExportError(f"int8 quantisation failed: {first_line(e)}", "run with -v for the traceback") from None
    finally:
        logging.getLogger().removeFilter(hint)
    logger.info("int8 QDQ graph (%s activations, calibrated on %d images): %s", activations, len(data), out_path)
    return out_path


def quantize_onnx_dynamic(fp32_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Writes the dynamically quantised version of an FP32 ONNX graph: int8 weights (per channel), activations
    quantised per batch at run time (MatMulInteger / ConvInteger). It needs no calibration data and fits models
    whose cost is in their linear layers (vision transformers).

    Raises:
        ExportError: onnxruntime's quantisation tools are missing or quantisation fails.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise ExportError(
            f"onnxruntime.quantization cannot be imported ({e})", "pip install onnxruntime-gpu (or onnxruntime) onnx"
        ) from None
    import onnx

    out_path = Path(out_path)
    # The exporter's recorded intermediate shapes (value_info) go stale once a Gemm's weight becomes a transposed
    # MatMulInteger operand, and quantize_dynamic's shape inference then fails on them: let it infer them afresh.
    model = onnx.load(str(fp32_path))
    del model.graph.value_info[:]
    bare = out_path.with_name(out_path.name + ".bare.onnx")
    onnx.save(model, str(bare))
    try:
        quantize_dynamic(str(bare), str(out_path), per_channel=True, weight_type=QuantType.QInt8)
    except Exception as e:  # onnxruntime.quantization raises plain exceptions of many types
        logger.debug("quantize_dynamic traceback", exc_info=True)
        raise ExportError(
            f"dynamic int8 quantisation failed: {first_line(e)}", "run with -v for the traceback"
        ) from None
    finally:
        bare.unlink(missing_ok=True)
    return out_path
