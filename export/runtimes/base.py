"""The runtime contract and its registry: :class:`Runtime`, :func:`register_runtime` and the lookups by name and
by artifact kind. The backends live beside it, one module each (``pytorch.py``, ``ort.py``, ``ov.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from slimforge.export.machine import default_threads
from slimforge.train.errors import ExportError

_RUNTIMES: dict[str, type[Runtime]] = {}
_DEFAULTS: dict[str, str] = {}  # artifact kind -> runtime name

CHECKPOINT_KIND = "checkpoint"
NO_GPU = "no CUDA GPU is visible"

# Precision names used in reports, from the most to the least precise (a peak is measured for each).
PRECISIONS = ("fp64", "fp32", "tf32", "bf16", "fp16", "int8")


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
        allow_factory: Load a checkpoint whose architecture is a user factory (imports and runs the code it names).
        tf32: On NVIDIA GPUs, let FP32 convolutions and matmuls run on TF32 tensor cores. Every GPU runtime sets it
            explicitly (never a library default) and a row that used it reports precision ``tf32``.
        max_batch: The largest batch the caller will run (TensorRT's optimisation profile must cover it).
    """

    name: ClassVar[str] = ""
    device: ClassVar[str] = "cpu"
    kinds: ClassVar[tuple[str, ...]] = ()
    """Artifact kinds it runs (``"checkpoint"`` or file suffixes); set by :func:`register_runtime`."""
    opt_in: ClassVar[bool] = False
    """Left out of the benchmark's default runtime set (costly to prepare, e.g. torch.compile)."""

    def __init__(
        self, threads: int | None = None, allow_factory: bool = False, tf32: bool = True, max_batch: int = 32
    ) -> None:
        self.threads = threads or default_threads()
        self.allow_factory = allow_factory
        self.tf32 = tf32
        self.max_batch = max_batch
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


def require_file(path: Path) -> None:
    if not path.is_file():
        raise ExportError(f"artifact {str(path)!r} does not exist", "export it with export/export.py")


def checked_onnx(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` once it is an existing ONNX file whose external data stays inside its folder (checked
    before any runtime opens it: :mod:`slimforge.export.external_data`)."""
    from slimforge.export.external_data import check_external_data

    path = Path(path)
    require_file(path)
    check_external_data(path)
    return path


def cuda_available() -> tuple[bool, str]:
    return (True, "") if torch.cuda.is_available() else (False, NO_GPU)
