"""PyTorch runtimes: a checkpoint in eager mode (FP32, bf16 autocast, channels_last, CUDA), under
``torch.compile``, and TorchScript files (CPU, CUDA)."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from slimforge.export.machine import cpu_has_bf16
from slimforge.export.runtimes.base import (
    CHECKPOINT_KIND,
    Runtime,
    cuda_available,
    register_runtime,
    require_file,
)
from slimforge.train.errors import ExportError, first_line

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
        # PyTorch's own defaults differ (cuDNN convolutions allow TF32, matmuls do not): set both, and say so.
        if self.device != "cuda":
            return
        torch.backends.cudnn.allow_tf32 = self.tf32
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        self.details["tf32"] = self.tf32
        if self.precision == "fp32" and self.tf32:
            self.precision = "tf32"

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
        from slimforge.train.checkpoint import load_checkpoint

        self._set_threads()
        # CheckpointError if broken, or a user factory without --allow-factory
        self.module, self.spec, self.meta = load_checkpoint(
            path, map_location="cpu", allow_factory=self.allow_factory, opt_in="pass --allow-factory"
        )
        self.module.to(self.device)
        self.precision = torch_precision(self.module)
        self._gpu_precision()


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


class _Cuda:
    """Mixin: the same runtime on the GPU (available where CUDA is)."""

    device: ClassVar[str] = "cuda"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return cuda_available()


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
class TorchEagerCuda(_Cuda, TorchEager):
    """A slimforge checkpoint in eager PyTorch on the GPU (FP32 weights; TF32 as the benchmark's ``tf32`` says)."""


@register_runtime("torch-eager-cuda-bf16", kinds=(CHECKPOINT_KIND,))
class TorchEagerCudaBf16(_Cuda, TorchEagerBf16):
    """A checkpoint on the GPU under ``torch.autocast(bfloat16)``."""


@register_runtime("torch-eager-cuda-fp16", kinds=(CHECKPOINT_KIND,))
class TorchEagerCudaFp16(_Cuda, TorchEager):
    """A checkpoint on the GPU under ``torch.autocast(float16)``: convs and matmuls in fp16, norms in fp32."""

    def load(self, path: str | os.PathLike) -> None:
        super().load(path)
        self.precision = "fp16"
        self.details["autocast"] = "float16 (convolution/linear/matmul in fp16; reductions and norms in fp32)"

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16):
            return super().forward(inputs)


@register_runtime("torch-eager-cuda-cl", kinds=(CHECKPOINT_KIND,))
class TorchEagerCudaChannelsLast(_Cuda, TorchEagerChannelsLast):
    """A checkpoint on the GPU with channels_last weights (cuDNN's NHWC kernels)."""


@register_runtime("torch-compile-cuda", kinds=(CHECKPOINT_KIND,), opt_in=True)
class TorchCompileCuda(_Cuda, TorchCompile):
    """A checkpoint on the GPU under ``torch.compile`` (inductor, Triton kernels); first calls compile."""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, why = cuda_available()
        if not ok:
            return ok, why
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "triton is not installed (inductor's GPU kernels need it; it ships with CUDA torch wheels)"
        return True, ""


@register_runtime("torchscript", default_for=(".pt", ".ts"))
class TorchScript(_TorchRuntime):
    """A TorchScript file (traced, optionally frozen), loaded with ``torch.jit.load``."""

    def load(self, path: str | os.PathLike) -> None:
        path = Path(path)
        require_file(path)
        self._set_threads()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
                self.module = torch.jit.load(str(path), map_location=self.device)
        except Exception as e:  # torch raises RuntimeError/ValueError/zip errors for corrupted archives
            raise ExportError(
                f"cannot load TorchScript artifact {path}: {first_line(e)}", "re-export it with export/export.py"
            ) from None
        self.module.eval()
        self.precision = torch_precision(self.module)
        if self.device == "cuda":
            # The graph's convolutions carry the TF32 switch they were traced with (export/to_torchscript.py traces
            # with it off); no runtime flag reaches them. The file decides, and the matmuls follow it so the whole
            # graph computes in one precision: the row's label is what ran, whatever tf32 asked for.
            self.details["tf32_requested"] = self.tf32
            self.tf32 = traced_tf32(self.module)
        self._gpu_precision()


def traced_tf32(module: torch.jit.ScriptModule) -> bool:
    """Whether any convolution of a TorchScript graph was traced with cuDNN's TF32 allowed (its last argument)."""
    graph = module.inlined_graph  # held: the nodes die with it
    return any(list(node.inputs())[-1].toIValue() for node in graph.findAllNodes("aten::_convolution"))


@register_runtime("torchscript-cuda", kinds=(".pt", ".ts"))
class TorchScriptCuda(_Cuda, TorchScript):
    """A TorchScript file on the GPU."""
