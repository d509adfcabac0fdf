"""The student-vs-teacher benchmark: every artifact on every runtime it can deploy on, one row each.

A run plan is artifacts × runtimes: an artifact named ``PATH@RUNTIME`` gets that runtime; any other gets every
selected runtime registered for its kind (a checkpoint: eager FP32, bf16 autocast, channels_last, CUDA; an
``.onnx``: ONNX Runtime CPU/CUDA/TensorRT, OpenVINO; ``.ts``: TorchScript CPU/CUDA). A runtime this machine
cannot run becomes a *skipped* row with the reason; an artifact that cannot be loaded or run becomes an *error*
row; the other rows still complete. Only a teacher that cannot run stops the benchmark (nothing to compare with).

Every row is measured the same way, with the same threads and the same real validation images
(:mod:`slimforge.export.measure`, by default each in a fresh process): accuracy and top-1 agreement with the FP32 eager
teacher, batch-1 latency percentiles, throughput over a batch sweep, peak memory, size, parameters and MACs, the
precision the runtime actually computed in, and the fraction of this machine's measured matrix-multiply peak of
that precision it achieved (:mod:`slimforge.export.peak`). The report recommends the fastest row within an accuracy
budget of the teacher (:func:`recommend`).

Example:
    >>> from slimforge.export.benchmarking import BenchConfig, run_benchmark
    >>> report = run_benchmark("runs/teacher/checkpoint", ["runs/student/export/model.onnx"], BenchConfig())
    ... # doctest: +SKIP
    >>> [(r["runtime"], r["status"]) for r in report["rows"]]  # doctest: +SKIP
    [('torch-eager', 'ok'), ('ort-cpu', 'ok'), ('ort-cuda', 'skipped'), ('ort-tensorrt', 'skipped'), ('openvino', 'ok')]
"""

from slimforge.export.benchmarking.config import BenchConfig
from slimforge.export.benchmarking.run import run_benchmark, write_benchmark

__all__ = ["BenchConfig", "run_benchmark", "write_benchmark"]
