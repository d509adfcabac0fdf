"""What an ONNX graph computes in, read from the graph itself or from ONNX Runtime's optimised version of it."""

from __future__ import annotations

import os
from collections import Counter

_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger"}
# Kernels that do the arithmetic, in ORT's optimised graph: float ones and the integer ones Q/DQ pairs fuse into.
_ORT_FLOAT_OPS = {"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
_ORT_INT8_OPS = {
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "MatMulInteger",
    "ConvInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QAttention",
}


def onnx_precision(path: str | os.PathLike) -> str:
    """The precision an ONNX graph computes in: int8 when it holds (Q/DQ or integer) quantised ops, else the
    dtype of its floating weights. Q/DQ pairs ORT cannot fuse still run fp32 kernels (see docs/benchmark.md), which
    :class:`OrtCpu` reads back from ORT's optimised graph."""
    try:
        import onnx
    except ImportError:
        return "unknown"
    model = onnx.load(str(path), load_external_data=False)
    if any(n.op_type in _QUANT_OPS for n in model.graph.node):
        return "int8"
    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    found = {names[t.data_type] for t in model.graph.initializer if t.data_type in names}
    if not found:
        return "unknown"
    return found.pop() if len(found) == 1 else "mixed(" + ",".join(sorted(found)) + ")"


def ort_compute_ops(optimized: str | os.PathLike) -> dict[str, int]:
    """Integer vs float convolution/matmul kernels in an ONNX Runtime optimised graph (``optimized_model_filepath``)."""
    import onnx

    graph = onnx.load(str(optimized), load_external_data=False).graph
    kinds = Counter(n.op_type for n in graph.node)
    return {
        "int8": sum(v for k, v in kinds.items() if k in _ORT_INT8_OPS),
        "fp32": sum(v for k, v in kinds.items() if k in _ORT_FLOAT_OPS),
    }
