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


# Operations that carry the multiply-accumulates, in ORT's optimised graph: input index of the weight, int8 or not.
_MAC_OPS = {
    "Conv": (1, False),
    "FusedConv": (1, False),
    "ConvTranspose": (1, False),
    "Gemm": (1, False),
    "FusedGemm": (1, False),
    "MatMul": (1, False),
    "FusedMatMul": (1, False),
    "QLinearConv": (3, True),
    "QGemm": (3, True),
    "QLinearMatMul": (3, True),
    "ConvInteger": (1, True),
    "MatMulInteger": (1, True),
    "MatMulIntegerToFloat": (1, True),
    "DynamicQuantizeMatMul": (1, True),
}
_CONVS = {"Conv", "FusedConv", "ConvTranspose", "QLinearConv", "ConvInteger"}


def _source_modules(model) -> dict[str, str]:
    """Node name → the PyTorch module it was exported from (the exporter's ``name_scopes``), where recorded."""
    import ast

    out = {}
    for n in model.graph.node:
        scopes = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if scopes:
            try:
                names = ast.literal_eval(scopes)
            except (ValueError, SyntaxError):
                continue
            if len(names) > 1:
                out[n.name] = names[-2]  # the last entry is the operation itself
    return out


def int8_macs(path: str | os.PathLike, input_shape: list[int], threads: int = 1) -> dict:
    """Which share of a graph's convolution / matmul multiply-accumulates ONNX Runtime (CPU) runs in integer kernels.

    ORT decides at session build which Q/DQ-wrapped operations become integer kernels (QLinearConv, QGemm,
    QLinearMatMul, MatMulInteger, ...). This builds a session at ``ORT_ENABLE_EXTENDED`` (every QDQ fusion, without
    the blocked NCHWc layout ``ORT_ENABLE_ALL`` gives the remaining float convolutions, whose padded shapes would
    miscount), saves its optimised graph, runs that graph once on zeros of ``input_shape`` with every MAC
    operation's output exposed, and counts per operation ``output elements × reduction length`` (``C_in / groups ×
    kh × kw`` for a convolution, the shared dimension for a matmul).

    Args:
        path: The ONNX model.
        input_shape: ``[1, C, H, W]``.
        threads: ORT intra-op threads for the probe.

    Returns:
        ``{"int8_macs", "total_macs", "fraction", "ops": {op_type: count}, "float_layers": [names]}``.

    Example:
        >>> int8_macs("model.int8.onnx", [1, 3, 224, 224])["fraction"]  # doctest: +SKIP
        1.0
    """
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort

    from slimforge.export.runtimes.ort import session_options

    modules = _source_modules(onnx.load(str(path), load_external_data=False))
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        so = session_options(threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = optimized
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        model = onnx.load(optimized)
        shapes = {t.name: list(t.dims) for t in model.graph.initializer}
        nodes = [n for n in model.graph.node if n.op_type in _MAC_OPS]
        wanted = {n.output[0] for n in nodes} | {n.input[_MAC_OPS[n.op_type][0]] for n in nodes}
        wanted -= set(shapes) | {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in sorted(wanted))
        probe = os.path.join(tmp, "probe.onnx")
        onnx.save(model, probe)
        session = ort.InferenceSession(
            probe, session_options(threads, optimize=False), providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        feed = {session.get_inputs()[0].name: np.zeros(input_shape, dtype=np.float32)}
        shapes.update({n: list(v.shape) for n, v in zip(names, session.run(None, feed))})
    total = int8 = 0
    float_layers = []
    for n in nodes:
        weight_index, integer = _MAC_OPS[n.op_type]
        w = shapes[n.input[weight_index]]
        if n.op_type in _CONVS:
            reduction = int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "FusedGemm", "QGemm"):
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            reduction = w[1] if trans_b else w[0]
        else:  # MatMul-like: B is [..., K, N]
            reduction = w[-2]
        macs = int(np.prod(shapes[n.output[0]])) * int(reduction)
        total += macs
        if integer:
            int8 += macs
        elif macs:
            float_layers.append(modules.get(n.name) or n.name or n.output[0])
    return {
        "int8_macs": int8,
        "total_macs": total,
        "fraction": int8 / total if total else None,
        "ops": dict(Counter(n.op_type for n in nodes)),
        "float_layers": float_layers,
    }
