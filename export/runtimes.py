"""Runtimes: one registered class per way of executing a model artifact.

Parity checks and the benchmark go through this registry only, so a new runtime is one class here and nothing
else changes. Registered here:

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
    >>> from export.runtimes import runtime_for
    >>> rt = runtime_for("out/model.onnx")(threads=2)  # doctest: +SKIP
    >>> rt.load("out/model.onnx")  # doctest: +SKIP
    >>> rt.run(images.numpy()).shape  # doctest: +SKIP
    (32, 10)
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from train.errors import ExportError, SlimforgeError

logger = logging.getLogger(__name__)

_RUNTIMES: dict[str, type[Runtime]] = {}
_DEFAULTS: dict[str, str] = {}  # artifact kind -> runtime name

CHECKPOINT_KIND = "checkpoint"
_ORT_FIX = "install ONNX Runtime: pip install onnxruntime-gpu (Linux x86_64, also runs on CPU) or onnxruntime"
_OV_FIX = "install OpenVINO: pip install openvino"
NO_GPU = "no CUDA GPU is visible"

# Precision names used in reports, from the most to the least precise (a peak is measured for each).
PRECISIONS = ("fp64", "fp32", "tf32", "bf16", "fp16", "int8")


def default_threads() -> int:
    """CPU cores this process may use (respects taskset / cgroup affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def precision_from_ops(ops: dict[str, int]) -> str:
    """``"int8"`` when every counted kernel is int8, else ``"mixed(int8:10,fp32:4)"`` (most used first)."""
    ops = {k: v for k, v in ops.items() if v}
    if not ops:
        return "unknown"
    if len(ops) == 1:
        return next(iter(ops))
    return "mixed(" + ",".join(f"{k}:{v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])) + ")"


class Runtime:
    """Loads one artifact and runs batches of images through it.

    Args:
        threads: Intra-op CPU threads; ``None`` uses every core this process may use.
    """

    name: ClassVar[str] = ""
    device: ClassVar[str] = "cpu"
    kinds: ClassVar[tuple[str, ...]] = ()
    """Artifact kinds it runs (``"checkpoint"`` or file suffixes); set by :func:`register_runtime`."""
    opt_in: ClassVar[bool] = False
    """Left out of the benchmark's default runtime set (costly to prepare, e.g. torch.compile)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or default_threads()
        self.precision = "fp32"
        self.compute_ops: dict[str, int] | None = None
        """Convolution / matmul kernels per precision, where the runtime reports what it compiled."""
        self.details: dict[str, Any] = {}
        """Runtime-specific facts for the report (providers, precision hint, autocast dtype, ...)."""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether this runtime can run here, and why not."""
        return True, ""

    @classmethod
    def summary(cls) -> str:
        """The first paragraph of the class docstring, on one line."""
        return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "")

    def load(self, path: str | os.PathLike) -> None:
        """Loads the artifact at ``path``.

        Raises:
            ExportError: the artifact is missing, corrupted or not of this runtime's kind.
        """
        raise NotImplementedError

    def input_shape(self) -> list[int | None] | None:
        """The input shape the artifact declares, ``None`` for a dynamic axis; ``None`` when it declares none."""
        return None

    def prepare(self, batch: np.ndarray) -> Any:
        """Host batch ``[B, C, H, W]`` float32 → the runtime's native input (not timed)."""
        return batch

    def forward(self, inputs: Any) -> Any:
        """Runs one batch; returns only once the logits are computed (this is the timed part)."""
        raise NotImplementedError

    def to_numpy(self, outputs: Any) -> np.ndarray:
        """Native output → logits ``[B, K]`` float32."""
        return np.array(outputs, dtype=np.float32)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``[B, K]`` for a host batch ``[B, C, H, W]`` float32."""
        return self.to_numpy(self.forward(self.prepare(np.ascontiguousarray(batch, dtype=np.float32))))

    def describe(self) -> dict[str, Any]:
        """What a report records about how this runtime ran."""
        return {
            "runtime": self.name,
            "device": self.device,
            "precision": self.precision,
            "compute_ops": self.compute_ops,
            "threads": self.threads,
            "details": self.details,
        }


def register_runtime(
    name: str, kinds: tuple[str, ...] = (), default_for: tuple[str, ...] = (), opt_in: bool = False
) -> Callable[[type[Runtime]], type[Runtime]]:
    """Registers a :class:`Runtime` subclass as ``name``.

    Args:
        name: Short name used on the command line (``model.onnx@ort-cpu``, ``--runtimes``) and in reports.
        kinds: Artifact kinds (``"checkpoint"`` or a file suffix like ``".onnx"``) it can run.
        default_for: Kinds it runs when a path names no runtime (implies ``kinds``).
        opt_in: Leave it out of the benchmark's default set (``--runtimes all`` or its name selects it).
    """

    def decorator(cls: type[Runtime]) -> type[Runtime]:
        if name in _RUNTIMES:
            raise ValueError(f"runtime {name!r} is registered twice")
        cls.name = name
        cls.kinds = tuple(dict.fromkeys((*kinds, *default_for)))
        cls.opt_in = opt_in
        _RUNTIMES[name] = cls
        for kind in default_for:
            _DEFAULTS[kind] = name
        return cls

    return decorator


def available_runtimes() -> list[str]:
    """Names of every registered runtime (available here or not)."""
    return sorted(_RUNTIMES)


def runtime_class(name: str) -> type[Runtime]:
    """The runtime class registered as ``name``, available here or not.

    Raises:
        ExportError: unknown name.
    """
    if name not in _RUNTIMES:
        raise ExportError(f"unknown runtime {name!r}", f"choose one of {', '.join(available_runtimes())}")
    return _RUNTIMES[name]


def runtimes_for_kind(kind: str) -> list[str]:
    """Names of the runtimes that run artifacts of ``kind``, in registration order."""
    return [name for name, cls in _RUNTIMES.items() if kind in cls.kinds]


def get_runtime(name: str) -> type[Runtime]:
    """The runtime class registered as ``name``.

    Raises:
        ExportError: unknown name, or the runtime cannot run on this machine.
    """
    cls = runtime_class(name)
    ok, why = cls.available()
    if not ok:
        raise ExportError(f"runtime {name!r} is not available here: {why}", "pick another runtime")
    return cls


def artifact_kind(path: str | os.PathLike) -> str:
    """``"checkpoint"`` for a slimforge checkpoint directory, else the file's lower-case suffix."""
    path = Path(path)
    if path.is_dir():
        return CHECKPOINT_KIND
    return path.suffix.lower()


def default_runtime(path: str | os.PathLike) -> str:
    """The name of the runtime that runs ``path`` when none is named.

    Raises:
        ExportError: no runtime runs this kind of file.
    """
    kind = artifact_kind(path)
    if kind not in _DEFAULTS:
        raise ExportError(
            f"no runtime runs {str(path)!r} (kind {kind or 'no suffix'!r})",
            f"pass a checkpoint directory, .onnx, .pt or .ts file, or name a runtime as PATH@RUNTIME "
            f"({', '.join(available_runtimes())})",
        )
    return _DEFAULTS[kind]


def runtime_for(path: str | os.PathLike, name: str | None = None) -> type[Runtime]:
    """The runtime named ``name``, or the default one for ``path``'s kind.

    Raises:
        ExportError: no runtime runs this kind of file, or the runtime is not available here.
    """
    return get_runtime(name if name is not None else default_runtime(path))


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise ExportError(f"artifact {str(path)!r} does not exist", "export it with export/export.py")


def _short(e: BaseException) -> str:
    """``Type: message`` on one line of at most 300 characters."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    # OpenVINO stacks "Exception from <file>:<line>:" and "Check '...' failed at <file>" frames above its message.
    message = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    text = " ".join(message[:2]) if message else (lines[0] if lines else "")
    return f"{type(e).__name__}: {text}"[:300]


def _cuda_available() -> tuple[bool, str]:
    return (True, "") if torch.cuda.is_available() else (False, NO_GPU)


_TORCH_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def torch_precision(module: torch.nn.Module) -> str:
    """The floating dtype(s) of a module's weights; frozen TorchScript keeps them as graph constants."""
    dtypes = {t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()}
    if not dtypes and isinstance(module, torch.jit.ScriptModule):
        for node in module.graph.nodes():
            out = node.output() if node.kind() == "prim::Constant" and node.outputsSize() == 1 else None
            if out is not None and isinstance(out.type(), torch._C.TensorType):
                value = out.toIValue()
                if value.is_floating_point():
                    dtypes.add(value.dtype)
    names = sorted(_TORCH_PRECISION.get(d, str(d)) for d in dtypes)
    if not names:
        return "unknown"
    return names[0] if len(names) == 1 else "mixed(" + ",".join(names) + ")"


class _TorchRuntime(Runtime):
    """Shared by the PyTorch runtimes: tensors in, ``inference_mode`` forward, a GPU sync before returning."""

    module: torch.nn.Module

    def _set_threads(self) -> None:
        # Process-wide: the benchmark sets the same count for every row so the rows compare fairly.
        torch.set_num_threads(self.threads)

    def _gpu_precision(self) -> None:
        # cuDNN runs FP32 convolutions on TF32 tensor cores unless told not to (PyTorch's default): say so.
        if self.device == "cuda" and self.precision == "fp32" and torch.backends.cudnn.allow_tf32:
            self.precision = "tf32"
            self.details["cudnn.allow_tf32"] = True

    def prepare(self, batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(batch).to(self.device)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.module(inputs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if self.device == "cuda":
            torch.cuda.synchronize()  # CUDA launches are async: without this the timer stops too early
        return out

    def to_numpy(self, outputs: torch.Tensor) -> np.ndarray:
        return outputs.detach().float().cpu().numpy()


@register_runtime("torch-eager", default_for=(CHECKPOINT_KIND,))
class TorchEager(_TorchRuntime):
    """A slimforge checkpoint directory, rebuilt and run in eager PyTorch (the FP32 reference)."""

    def load(self, path: str | os.PathLike) -> None:
        from train.checkpoint import load_checkpoint

        self._set_threads()
        self.module, self.spec, self.meta = load_checkpoint(path, map_location="cpu")  # CheckpointError if broken
        self.module.to(self.device)
        self.precision = torch_precision(self.module)
        self._gpu_precision()


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


@register_runtime("torch-eager-bf16", kinds=(CHECKPOINT_KIND,))
class TorchEagerBf16(TorchEager):
    """A checkpoint in eager PyTorch under ``torch.autocast(bfloat16)``: convs and matmuls in bf16, norms in fp32."""

    def load(self, path: str | os.PathLike) -> None:
        super().load(path)
        self.precision = "bf16"
        self.details["autocast"] = "bfloat16 (convolution/linear/matmul in bf16; reductions and norms in fp32)"
        if self.device == "cpu" and not cpu_has_bf16():
            self.details["note"] = "this CPU has no bf16 instructions: bf16 is emulated"

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device, dtype=torch.bfloat16):
            return super().forward(inputs)


@register_runtime("torch-eager-cl", kinds=(CHECKPOINT_KIND,))
class TorchEagerChannelsLast(TorchEager):
    """A checkpoint in eager PyTorch with channels_last (NHWC) weights; inputs arrive NCHW, converted in the timed
    forward as a deployed model would."""

    def load(self, path: str | os.PathLike) -> None:
        super().load(path)
        self.module = self.module.to(memory_format=torch.channels_last)
        self.details["memory_format"] = "channels_last"


def _cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@register_runtime("torch-compile", kinds=(CHECKPOINT_KIND,), opt_in=True)
class TorchCompile(TorchEager):
    """A checkpoint under ``torch.compile`` (inductor, default mode); each new input shape compiles on its first
    call, which the benchmark reports as first-run time."""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if _cxx_compiler() is None:
            return False, "no C++ compiler on PATH (inductor builds its CPU kernels with one: apt-get install g++)"
        return True, ""

    def load(self, path: str | os.PathLike) -> None:
        super().load(path)
        self.module = torch.compile(self.module)
        self.details["compiler"] = "inductor (torch.compile default mode, automatic dynamic shapes)"


@register_runtime("torch-eager-cuda", kinds=(CHECKPOINT_KIND,))
class TorchEagerCuda(TorchEager):
    """A slimforge checkpoint in eager PyTorch on the GPU."""

    device: ClassVar[str] = "cuda"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return _cuda_available()


@register_runtime("torchscript", default_for=(".pt", ".ts"))
class TorchScript(_TorchRuntime):
    """A TorchScript file (traced, optionally frozen), loaded with ``torch.jit.load``."""

    def load(self, path: str | os.PathLike) -> None:
        path = Path(path)
        _require_file(path)
        self._set_threads()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
                self.module = torch.jit.load(str(path), map_location=self.device)
        except Exception as e:  # torch raises RuntimeError/ValueError/zip errors for corrupted archives
            raise ExportError(
                f"cannot load TorchScript artifact {path}: {_short(e)}", "re-export it with export/export.py"
            ) from None
        self.module.eval()
        self.precision = torch_precision(self.module)
        self._gpu_precision()


@register_runtime("torchscript-cuda", kinds=(".pt", ".ts"))
class TorchScriptCuda(TorchScript):
    """A TorchScript file on the GPU."""

    device: ClassVar[str] = "cuda"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return _cuda_available()


def import_onnxruntime():
    """``onnxruntime``, or an ExportError naming the package to install."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"onnxruntime cannot be imported ({e})", _ORT_FIX) from None
    return onnxruntime


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
    dtype of its floating weights. Q/DQ pairs ORT cannot fuse still run fp32 kernels (see FACTS.md), which
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


@register_runtime("ort-cpu", default_for=(".onnx",))
class OrtCpu(Runtime):
    """ONNX Runtime on the CPUExecutionProvider."""

    providers: ClassVar[list[str]] = ["CPUExecutionProvider"]

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import_onnxruntime()
        except SlimforgeError as e:
            return False, e.problem
        return True, ""

    def load(self, path: str | os.PathLike) -> None:
        ort = import_onnxruntime()
        path = Path(path)
        _require_file(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1  # one image graph at a time: parallelism is inside the ops
        so.log_severity_level = 3  # errors only; load failures surface as exceptions below
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
                    f"cannot load ONNX artifact {path}: {_short(e)}", "re-export it with export/export.py"
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

    def input_shape(self) -> list[int | None] | None:
        return self._shape

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        # session.run is synchronous and returns host arrays, also with the CUDA provider.
        return self.session.run([self.output_name], {self.input_name: inputs})[0]


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
        ok, why = _cuda_available()
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
        path = Path(path)
        _require_file(path)
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
                f"cannot load artifact {path} in OpenVINO: {_short(e)}", "re-export it with export/export.py"
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
