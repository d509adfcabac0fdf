"""Export formats: what each one writes, from which kind of checkpoint, and how its artifact is checked.

=================  ===================  ===================  =========================================================
format             checkpoint           file                 checks
=================  ===================  ===================  =========================================================
``onnx``           float                ``model.onnx``       ORT vs the PyTorch model: logits to ``parity.rtol``
``torchscript``    float or quantised   ``model.ts``         TorchScript vs the PyTorch model: logits to ``parity.rtol``
``onnx-qdq``       quantised (qat/ptq)  ``model.int8.onnx``  emulated: ORT without optimisations vs the fake-quant
                                                             model; deployed: optimised ORT (integer kernels) vs it,
                                                             top-1; int8 share of the MACs >= the minimum
``onnx-int8``      float                ``model.int8.onnx``  post-training quantisation (``int8.calibrator``) in
                                                             slimforge's fake-quant, then as ``onnx-qdq``
``onnx-int8-ort``  float                ``model.ort-int8.onnx``  ONNX Runtime's own ``quantize_static``: deployed
                                                             top-1 vs the float model; int8 share of the MACs
``onnx-dynamic``   float                ``model.dynamic.onnx``   ONNX Runtime's ``quantize_dynamic`` (weights int8,
                                                             activations quantised per batch): top-1 vs the float model
=================  ===================  ===================  =========================================================

A format's exporter writes the artifact and returns the fake-quant model it exported when that is not the
checkpoint's model itself (post-training quantisation makes one); checks then compare against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from slimforge.export.description import embed_onnx, torchscript_extra_files
from slimforge.export.to_onnx import export_onnx
from slimforge.export.to_torchscript import export_torchscript

if TYPE_CHECKING:
    from slimforge.export.artifacts import ExportConfig


@dataclass
class ExportInputs:
    """What an exporter may feed the model."""

    example: torch.Tensor
    """``[2, C, H, W]`` validation images (two, so no exporter specialises the batch axis to 1)."""
    calibration: Callable[[int], torch.Tensor]
    """``n`` → ``[n, C, H, W]`` training images, preprocessed as the model's eval transform (loaded on demand)."""
    description: dict[str, Any]
    """The checkpoint's model description, embedded in every artifact (:mod:`slimforge.export.description`)."""


Exporter = Callable[[nn.Module, ExportInputs, Path, "ExportConfig"], nn.Module | None]


@dataclass
class Check:
    """One comparison an artifact must pass: run it in ``runtime``, compare with the reference logits."""

    name: str
    """``parity`` (float formats), ``emulated`` or ``deployed`` (int8 formats)."""
    runtime: str
    tolerance: str
    """Dotted :class:`ExportConfig` field holding the :class:`ParityConfig` (``parity``, ``int8.deployed`` ...)."""
    reference: Literal["checkpoint", "quantized"] = "checkpoint"
    """Compare with the checkpoint's model, or with the fake-quant model the artifact was exported from."""


@dataclass
class ArtifactFormat:
    name: str
    filename: str
    exporter: Exporter
    checks: list[Check]
    checkpoint: Literal["float", "quantized", "any"] = "any"
    """Which checkpoints it exports: float ones, quantised ones (a qat/ptq recipe step), or both."""
    mac_gate: bool = False
    """Fail the artifact when less than ``int8.min_int8_mac_fraction`` of its MACs run in integer kernels."""
    options: Callable[[ExportConfig], dict[str, Any]] = field(default=lambda cfg: {})
    """What the report records about how it was made."""


FORMATS: dict[str, ArtifactFormat] = {}


def register_format(name: str, filename: str, checks: list[Check], **kwargs: Any) -> Callable[[Exporter], Exporter]:
    """Registers ``fn(model, inputs, path, cfg) -> quantized model | None`` as export format ``name``."""

    def decorator(fn: Exporter) -> Exporter:
        if name in FORMATS:
            raise ValueError(f"export format {name!r} is registered twice")
        FORMATS[name] = ArtifactFormat(name, filename, fn, checks, **kwargs)
        return fn

    return decorator


def available_formats() -> list[str]:
    return sorted(FORMATS)


_INT8_CHECKS = [
    Check("emulated", "ort-cpu-emulated", "int8.emulated", "quantized"),
    Check("deployed", "ort-cpu", "int8.deployed", "quantized"),
]


def _opset(cfg: ExportConfig) -> dict[str, Any]:
    return {"opset": cfg.opset}


@register_format("onnx", "model.onnx", [Check("parity", "ort-cpu", "parity")], checkpoint="float", options=_opset)
def _onnx(model: nn.Module, inputs: ExportInputs, path: Path, cfg: ExportConfig) -> None:
    export_onnx(model, inputs.example, path, opset=cfg.opset)
    embed_onnx(path, inputs.description)


@register_format(
    "torchscript", "model.ts", [Check("parity", "torchscript", "parity")], options=lambda cfg: {"frozen": cfg.freeze}
)
def _torchscript(model: nn.Module, inputs: ExportInputs, path: Path, cfg: ExportConfig) -> None:
    extra = torchscript_extra_files(inputs.description)
    export_torchscript(model, inputs.example, path, freeze=cfg.freeze, extra_files=extra)


def _export_qdq(quantized: nn.Module, inputs: ExportInputs, path: Path, cfg: ExportConfig) -> None:
    from slimforge.compress.quantize.lowering import lower

    export_onnx(lower(quantized), inputs.example, path, opset=cfg.opset)
    embed_onnx(path, inputs.description)


@register_format("onnx-qdq", "model.int8.onnx", _INT8_CHECKS, checkpoint="quantized", mac_gate=True, options=_opset)
def _onnx_qdq(model: nn.Module, inputs: ExportInputs, path: Path, cfg: ExportConfig) -> None:
    _export_qdq(model, inputs, path, cfg)  # the checkpoint's learned scales, never re-calibrated


def _ptq_options(cfg: ExportConfig) -> dict[str, Any]:
    q = cfg.int8
    return {"opset": cfg.opset, "calibrator": q.calibrator, "calibration_images": q.calibration_images}


@register_format("onnx-int8", "model.int8.onnx", _INT8_CHECKS, checkpoint="float", mac_gate=True, options=_ptq_options)
def _onnx_int8(model: nn.Module, inputs: ExportInputs, path: Path, cfg: ExportConfig) -> nn.Module:
    import copy

    from slimforge.compress.api import CompressionContext
    from slimforge.compress.quantize.config import PTQConfig
    from slimforge.compress.quantize.methods import PostTrainingQuantization

    q = cfg.int8
    images = inputs.calibration(q.calibration_images)  # [n, C, H, W]
    ptq = PostTrainingQuantization(
        PTQConfig(
            backend=q.backend,
            activations=q.activations,
            calibration_images=len(images),
            calibrator=q.calibrator,
            percentile=q.percentile,
        )
    )
    ctx = CompressionContext(example_input=inputs.example[:1], batches=lambda n: iter(images[:n].split(32)))
    quantized = ptq.prepare(copy.deepcopy(model), ctx).eval()
    _export_qdq(quantized, inputs, path, cfg)
    return quantized


@register_format(
    "onnx-int8-ort",
    "model.ort-int8.onnx",
    [Check("deployed", "ort-cpu", "int8.versus_float")],
    checkpoint="float",
    mac_gate=True,
    options=lambda cfg: {"opset": cfg.opset, "calibration_images": cfg.int8.calibration_images},
)
def _onnx_int8_ort(model: nn.Module, inputs: ExportInputs, path: Path, cfg: ExportConfig) -> None:
    from slimforge.export.to_onnx_int8 import quantize_onnx_int8

    fp32 = path.with_name(path.name + ".fp32.onnx")
    try:
        export_onnx(model, inputs.example, fp32, opset=cfg.opset)
        calibration = inputs.calibration(cfg.int8.calibration_images).numpy()
        activations = cfg.int8.activations or "uint8"
        quantize_onnx_int8(fp32, path, calibration, activations=activations, method=cfg.int8.calibrator)
        embed_onnx(path, inputs.description)
    finally:
        fp32.unlink(missing_ok=True)


@register_format(
    "onnx-dynamic", "model.dynamic.onnx", [Check("deployed", "ort-cpu", "int8.versus_float")], checkpoint="float",
    options=_opset,
)  # fmt: skip
def _onnx_dynamic(model: nn.Module, inputs: ExportInputs, path: Path, cfg: ExportConfig) -> None:
    from slimforge.export.to_onnx_int8 import quantize_onnx_dynamic

    fp32 = path.with_name(path.name + ".fp32.onnx")
    try:
        export_onnx(model, inputs.example, fp32, opset=cfg.opset)
        quantize_onnx_dynamic(fp32, path)
        embed_onnx(path, inputs.description)
    finally:
        fp32.unlink(missing_ok=True)
