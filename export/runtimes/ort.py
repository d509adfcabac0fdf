"""ONNX Runtime: the CPU, CUDA and TensorRT execution providers, and the one session-options builder every
ONNX Runtime session in slimforge uses."""

from __future__ import annotations

import ctypes.util
import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

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


def node_placement(profile_file: str) -> dict[str, dict[str, int]]:
    """``{provider: {op type: nodes}}`` from an ONNX Runtime profile (its per-node kernel events)."""
    try:
        events = json.loads(Path(profile_file).read_text())
    except (OSError, ValueError) as e:
        logger.debug("cannot read ONNX Runtime profile %s: %s", profile_file, e)
        return {}
    seen: dict[str, tuple[str, str]] = {}
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") == "Node" and "provider" in args and ev.get("name", "").endswith("_kernel_time"):
            seen[ev["name"]] = (args["provider"], args.get("op_name", "?"))
    out: dict[str, Counter] = {}
    for provider, op in seen.values():
        out.setdefault(provider, Counter())[op] += 1
    return {p: dict(c) for p, c in out.items()}


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

    def provider_options(self, path: Path, declared: str) -> list[dict[str, str]]:
        """One options dict per entry of :attr:`providers` (the GPU providers set theirs explicitly)."""
        return [{} for _ in self.providers]

    def load(self, path: str | os.PathLike) -> None:
        ort = import_onnxruntime()
        path = checked_onnx(path)
        so = session_options(self.threads, optimize=self.optimize)
        try:
            declared = onnx_precision(path)
        except Exception as e:  # a corrupted protobuf: the session below names the problem the same way
            declared = "unknown"
            logger.debug("cannot read %s with onnx: %s", path, e)
        on_cpu = self.providers[0] == "CPUExecutionProvider"
        with tempfile.TemporaryDirectory() as tmp:
            if declared == "int8" and on_cpu:
                # Which Q/DQ pairs became integer kernels is decided at session build: read back the optimised graph.
                # Never with a compiling provider (TensorRT): its fused nodes cannot be saved as an ONNX graph.
                so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
            if not on_cpu:
                # Profile the first call only, to read back which provider ran each node (fallbacks are named).
                so.enable_profiling = True
                so.profile_file_prefix = os.path.join(tmp, "profile")
            try:
                options = self.provider_options(path, declared)
                self.session = ort.InferenceSession(str(path), so, providers=list(zip(self.providers, options)))
            except SlimforgeError:
                raise
            except Exception as e:  # ORT raises its own pybind exception types (InvalidProtobuf, Fail, ...)
                raise ExportError(
                    f"cannot load ONNX artifact {path}: {first_line(e)}", "re-export it with export/export.py"
                ) from None
            self.precision = declared
            if declared == "int8" and on_cpu and os.path.isfile(so.optimized_model_filepath):
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
            if not on_cpu:
                self._read_node_placement()
        if declared == "int8" and self.optimize and on_cpu:
            if all(isinstance(d, int) for d in self._shape[1:]):
                report = int8_macs(path, [1, *self._shape[1:]], threads=self.threads)
                self.details["int8_mac_fraction"] = report["fraction"]
                self.details["int8_macs"] = {k: report[k] for k in ("int8_macs", "total_macs", "ops", "float_layers")}

    def _read_node_placement(self) -> None:
        """Runs one batch-1 call with profiling on and records how many graph nodes each provider ran; nodes that
        left the first provider are named in ``details["fallback"]`` (the report shows it as a note)."""
        if all(d is not None for d in self._shape[1:]):
            zeros = np.zeros([1, *self._shape[1:]], dtype=np.float32)
            self.session.run([self.output_name], {self.input_name: zeros})
        placement = node_placement(self.session.end_profiling())
        self.details["nodes_per_provider"] = {k: sum(v.values()) for k, v in placement.items()}
        fallen = {p: ops for p, ops in placement.items() if p != self.providers[0]}
        if fallen:
            self.details["fallback"] = "; ".join(
                f"{sum(ops.values())} node(s) ran on {p} instead of {self.providers[0]} ("
                + ", ".join(f"{op}×{n}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1]))
                + ")"
                for p, ops in fallen.items()
            )

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
    """ONNX Runtime on the CUDAExecutionProvider, with IO binding: the input is on the GPU before the timed call and
    the output stays there, so host copies are outside the timing (as for the PyTorch CUDA rows)."""

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

    def provider_options(self, path: Path, declared: str) -> list[dict[str, str]]:
        # use_tf32 is on by default in the CUDA provider: set it either way, and label the row by it.
        return [{"device_id": "0", "use_tf32": "1" if self.tf32 else "0"}, {}]

    def load(self, path: str | os.PathLike) -> None:
        super().load(path)
        self.details["tf32"] = self.tf32
        if self.precision == "fp32" and self.tf32:
            self.precision = "tf32"

    def prepare(self, batch: np.ndarray) -> Any:
        ort = import_onnxruntime()
        x = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)  # host-to-device copy, untimed
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, x)
        binding.bind_output(self.output_name, "cuda", 0)
        return binding, x  # keep the device input alive as long as the binding

    def forward(self, inputs: Any) -> Any:
        binding, _ = inputs
        # Run synchronises the provider's stream before returning (ONNX Runtime's default run option).
        self.session.run_with_iobinding(binding)
        return binding

    def to_numpy(self, outputs: Any) -> np.ndarray:
        return np.asarray(outputs.copy_outputs_to_cpu()[0], dtype=np.float32)


def tensorrt_cache_dir(path: Path) -> Path:
    """Where TensorRT's engine and timing caches for ``path`` live: ``$SLIMFORGE_TRT_CACHE`` (default
    ``~/.cache/slimforge/tensorrt``) / the first 16 hex digits of the file's SHA-256, so an edited model never
    reuses another's engine."""
    root = Path(os.environ.get("SLIMFORGE_TRT_CACHE") or Path.home() / ".cache" / "slimforge" / "tensorrt")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return root / digest.hexdigest()[:16]


@register_runtime("ort-tensorrt", kinds=(".onnx",))
class OrtTensorRT(OrtCuda):
    """ONNX Runtime on the TensorrtExecutionProvider: engine and timing caches on disk, one optimisation profile
    covering every batch size the benchmark runs, int8 for a Q/DQ graph; nodes TensorRT does not take are named."""

    providers: ClassVar[list[str]] = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    fp16: ClassVar[bool] = False

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

    def provider_options(self, path: Path, declared: str) -> list[dict[str, str]]:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        inp = graph.input[0]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        cache = tensorrt_cache_dir(path)
        cache.mkdir(parents=True, exist_ok=True)
        trt = {
            "device_id": "0",
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": str(cache),
            "trt_fp16_enable": "1" if self.fp16 else "0",
            # A Q/DQ graph is explicitly quantised: TensorRT needs int8 enabled to honour its Q/DQ pairs.
            "trt_int8_enable": "1" if declared == "int8" else "0",
        }
        if len(dims) == 4 and all(d for d in dims[1:]):
            shape = "x".join(str(d) for d in dims[1:])
            # One profile from batch 1 to the largest batch the caller runs, tuned for batch 1 (the latency row).
            trt["trt_profile_min_shapes"] = f"{inp.name}:1x{shape}"
            trt["trt_profile_opt_shapes"] = f"{inp.name}:1x{shape}"
            trt["trt_profile_max_shapes"] = f"{inp.name}:{self.max_batch}x{shape}"
        self.details["tensorrt"] = {k: v for k, v in trt.items() if k != "device_id"}
        return [trt, super().provider_options(path, declared)[0], {}]

    def load(self, path: str | os.PathLike) -> None:
        super().load(path)
        declared = self.precision if self.precision != "tf32" else "fp32"
        if self.fp16 and declared in ("fp32", "tf32"):
            self.precision = "fp16"
        elif declared == "fp32":
            # TensorRT allows TF32 for FP32 layers by default; ONNX Runtime's provider has no switch for it.
            self.precision = "tf32"
        self.details["tf32"] = "TensorRT default (allowed for FP32 layers)"


@register_runtime("ort-tensorrt-fp16", kinds=(".onnx",))
class OrtTensorRTFp16(OrtTensorRT):
    """ONNX Runtime's TensorRT provider with fp16 kernels allowed (``trt_fp16_enable``)."""

    fp16: ClassVar[bool] = True
