"""Runtimes: one registered class per way of executing a model artifact.

Parity checks and the benchmark go through this registry only, so a new runtime is one class in one backend
module and nothing else changes. Registered:

=================  ===========================  =====================================================
name               runs                         computes in
=================  ===========================  =====================================================
torch-eager        checkpoint (CPU)             the weights' dtype (fp32): the reference
torch-eager-bf16   checkpoint (CPU)             bf16 under ``torch.autocast`` (norms/softmax in fp32)
torch-eager-cl     checkpoint (CPU)             fp32, channels_last memory format
torch-compile      checkpoint (CPU, opt-in)     fp32, inductor-compiled (compile time is measured)
torch-eager-cuda   checkpoint (GPU)             fp32 weights; cuDNN may use TF32 for convolutions
torchscript        ``.ts`` / ``.pt`` (CPU)      the graph's constants (fp32)
torchscript-cuda   ``.ts`` / ``.pt`` (GPU)      as torchscript
ort-cpu            ``.onnx``                    fp32, or int8 where ORT fused Q/DQ into integer kernels
ort-cuda           ``.onnx`` (GPU)              as the graph
ort-tensorrt       ``.onnx`` (GPU)              as the graph (TensorRT EP)
openvino           ``.onnx`` / ``.xml`` (CPU)   OpenVINO's choice: bf16 on CPUs that have it
openvino-fp32      ``.onnx`` / ``.xml`` (CPU)   fp32 pinned by ``INFERENCE_PRECISION_HINT=f32``
=================  ===========================  =====================================================

A runtime is picked by name, or by the artifact kind it is the default for (a checkpoint directory, ``.onnx``,
``.pt`` / ``.ts``). :meth:`Runtime.available` says whether it can run on this machine and why not, so a
benchmark lists an unavailable runtime as skipped with its reason instead of dropping it.

Every runtime splits a call in three so a benchmark times only the model: :meth:`Runtime.prepare` moves a host
batch to the runtime's native input (untimed), :meth:`Runtime.forward` runs it and returns once the result is
ready (timed; GPU runtimes synchronise here), :meth:`Runtime.to_numpy` brings logits back (untimed).

After :meth:`Runtime.load`, ``precision`` says what the runtime actually computed in, read back from the runtime
itself where it can tell (OpenVINO's compiled graph, ONNX Runtime's optimised graph), and ``compute_ops`` counts
the convolution / matmul kernels per precision when it is known.

Example:
    >>> from slimforge.export.runtimes import runtime_for
    >>> rt = runtime_for("out/model.onnx")(threads=2)  # doctest: +SKIP
    >>> rt.load("out/model.onnx")  # doctest: +SKIP
    >>> rt.run(images.numpy()).shape  # doctest: +SKIP
    (32, 10)
"""

# The backends register themselves on import, in this order (the order a benchmark plans an artifact's rows in).
# isort: off
from slimforge.export.runtimes import pytorch  # noqa: F401
from slimforge.export.runtimes import ort  # noqa: F401
from slimforge.export.runtimes import ov  # noqa: F401

# isort: on
from slimforge.export.runtimes.base import (
    CHECKPOINT_KIND,
    NO_GPU,
    PRECISIONS,
    Runtime,
    artifact_kind,
    available_runtimes,
    default_runtime,
    get_runtime,
    precision_from_ops,
    register_runtime,
    runtime_class,
    runtime_for,
    runtimes_for_kind,
)

__all__ = [
    "CHECKPOINT_KIND",
    "NO_GPU",
    "PRECISIONS",
    "Runtime",
    "artifact_kind",
    "available_runtimes",
    "default_runtime",
    "get_runtime",
    "precision_from_ops",
    "register_runtime",
    "runtime_class",
    "runtime_for",
    "runtimes_for_kind",
]
