"""Checkpoint → verified artifacts: a registry of export formats and the one verb that runs them.

Each format is an exporter function plus the runtime that checks it. :func:`export_checkpoint` writes every
artifact under a temporary name, runs it against the eager PyTorch model on real validation images, and only
then publishes it:

* parity passed → renamed to its final name (``model.onnx``, ``model.ts``, ``model.int8.onnx``);
* parity failed → renamed to ``<final name>.failed`` (kept for debugging; no loader picks it up by its suffix);
* export crashed → the temporary file is deleted.

So a file under a final name is always complete and verified. A format not meant to reproduce the FP32
logits (``onnx-int8``) is checked with its own, looser :class:`ParityConfig` (top-1 agreement only).
``export_report.json`` records every artifact's numbers, and ``model.json`` (the checkpoint's description) lets
the benchmark rebuild the architecture for parameter and MAC counts and feed the artifact the right images.

Example:
    >>> from slimforge.export.artifacts import ExportConfig, export_checkpoint
    >>> report = export_checkpoint("runs/student/checkpoint", "runs/student/export", ExportConfig())  # doctest: +SKIP
    >>> report["passed"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimforge.export.description import MODEL_JSON, embed_onnx, torchscript_extra_files
from slimforge.export.evaldata import ValidationSet, data_config_from_meta
from slimforge.export.machine import library_versions
from slimforge.export.report import now, write_json
from slimforge.export.runtimes import get_runtime
from slimforge.export.to_onnx import MIN_OPSET, export_onnx
from slimforge.export.to_onnx_int8 import ACTIVATION_TYPES, quantize_onnx_int8
from slimforge.export.to_torchscript import export_torchscript
from slimforge.export.verify import ParityConfig, batch_plan, check_parity, reference_logits
from slimforge.train.checkpoint import file_sha256, load_checkpoint
from slimforge.train.errors import SlimforgeError

logger = logging.getLogger(__name__)

REPORT = "export_report.json"
REPORT_FORMAT = "slimforge.export"
REPORT_VERSION = 1
FAILED_SUFFIX = ".failed"


@dataclass
class ExportConfig:
    """What to export and how strictly to check it."""

    formats: list[str] = field(default_factory=lambda: ["onnx", "torchscript"])
    """Registered format names (:func:`available_formats`): ``onnx``, ``torchscript``, ``onnx-int8``."""
    opset: int = 18
    """ONNX opset (>= 17)."""
    freeze: bool = True
    """TorchScript: ``torch.jit.freeze`` the traced module (weights become constants, BatchNorm folded)."""
    max_images: int | None = 512
    """Validation images the parity check runs on; ``None`` uses the whole validation split."""
    data_overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of the checkpoint's recorded DataConfig (or a full description when it has none)."""
    threads: int | None = None
    """CPU threads of the checking runtimes; ``None``: all usable cores."""
    parity: ParityConfig = field(default_factory=ParityConfig)
    """Tolerances of the formats meant to reproduce the FP32 logits (onnx, torchscript)."""
    calibration_images: int = 256
    """onnx-int8: training images (eval transform) its activation ranges are calibrated on."""
    int8_activations: str = "uint8"
    """onnx-int8: ``uint8`` (U8S8, what ORT's x86 integer convolutions take) or ``int8`` (S8S8)."""
    int8_parity: ParityConfig = field(default_factory=lambda: ParityConfig(rtol=None, min_agreement=0.9))
    """onnx-int8: int8 logits are not FP32 logits, so only top-1 agreement is checked (``rtol`` None); 0.9 lets
    a trained model's near-ties flip while catching a broken quantisation (random-like agreement)."""

    def validate(self) -> list[str]:
        p = [f"parity.{x}" for x in self.parity.validate()]
        p += [f"int8_parity.{x}" for x in self.int8_parity.validate()]
        if self.calibration_images < 1:
            p.append(f"calibration_images: {self.calibration_images} must be >= 1")
        if self.int8_activations not in ACTIVATION_TYPES:
            p.append(f"int8_activations: {self.int8_activations!r} must be one of {', '.join(ACTIVATION_TYPES)}")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            p.append(f"formats: unknown {unknown}; choose from {', '.join(available_formats())}")
        if not self.formats:
            p.append("formats: name at least one format")
        if self.opset < MIN_OPSET:
            p.append(f"opset: {self.opset} must be >= {MIN_OPSET}")
        if self.max_images is not None and self.max_images < 2:
            p.append(f"max_images: {self.max_images} must be >= 2 (two batch sizes are checked)")
        return p


@dataclass
class ExportInputs:
    """What an exporter may feed the model."""

    example: torch.Tensor
    """``[2, C, H, W]`` validation images (two, so no exporter specialises the batch axis to 1)."""
    calibration: Callable[[int], torch.Tensor]
    """``n`` → ``[n, C, H, W]`` training images, preprocessed as the model's eval transform (loaded on demand)."""
    description: dict[str, Any]
    """The checkpoint's model description, embedded in every artifact (:mod:`slimforge.export.description`)."""


Exporter = Callable[[nn.Module, ExportInputs, Path, ExportConfig], None]


@dataclass
class ArtifactFormat:
    """One export format: where it is written, how, which runtime checks it and with which tolerances."""

    name: str
    filename: str
    runtime: str
    exporter: Exporter
    parity: str = "parity"
    """The :class:`ExportConfig` field holding this format's :class:`ParityConfig`."""


FORMATS: dict[str, ArtifactFormat] = {}


def register_format(name: str, filename: str, runtime: str, parity: str = "parity") -> Callable[[Exporter], Exporter]:
    """Registers ``fn(model, inputs, path, cfg)`` as export format ``name``.

    Args:
        name: Format name (``--formats``).
        filename: The verified artifact's name in the output directory.
        runtime: The registered runtime that runs it for the parity check.
        parity: The :class:`ExportConfig` field with its tolerances.
    """

    def decorator(fn: Exporter) -> Exporter:
        if name in FORMATS:
            raise ValueError(f"export format {name!r} is registered twice")
        FORMATS[name] = ArtifactFormat(name, filename, runtime, fn, parity)
        return fn

    return decorator


def available_formats() -> list[str]:
    return sorted(FORMATS)


@register_format("onnx", "model.onnx", runtime="ort-cpu")
def _onnx(model: nn.Module, inputs: ExportInputs, path: Path, cfg: ExportConfig) -> None:
    export_onnx(model, inputs.example, path, opset=cfg.opset)
    embed_onnx(path, inputs.description)


@register_format("torchscript", "model.ts", runtime="torchscript")
def _torchscript(model: nn.Module, inputs: ExportInputs, path: Path, cfg: ExportConfig) -> None:
    export_torchscript(
        model, inputs.example, path, freeze=cfg.freeze, extra_files=torchscript_extra_files(inputs.description)
    )


@register_format("onnx-int8", "model.int8.onnx", runtime="ort-cpu", parity="int8_parity")
def _onnx_int8(model: nn.Module, inputs: ExportInputs, path: Path, cfg: ExportConfig) -> None:
    fp32 = path.with_name(path.name + ".fp32.onnx")
    try:
        export_onnx(model, inputs.example, fp32, opset=cfg.opset)
        calibration = inputs.calibration(cfg.calibration_images).numpy()
        quantize_onnx_int8(fp32, path, calibration, activations=cfg.int8_activations)
        embed_onnx(path, inputs.description)
    finally:
        fp32.unlink(missing_ok=True)


def _export_one(
    fmt: ArtifactFormat,
    model: nn.Module,
    inputs: ExportInputs,
    images: torch.Tensor,
    reference,
    plan,
    out: Path,
    cfg: ExportConfig,
) -> dict[str, Any]:
    final = out / fmt.filename
    failed = final.with_name(final.name + FAILED_SUFFIX)
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")
    # A previous run's artifact would look like this run's output: remove it before anything can fail.
    for stale in (final, failed, tmp):
        stale.unlink(missing_ok=True)
    entry: dict[str, Any] = {"format": fmt.name, "file": None, "runtime": fmt.runtime, "status": "error"}
    start = time.perf_counter()
    try:
        fmt.exporter(model, inputs, tmp, cfg)
        entry["export_seconds"] = round(time.perf_counter() - start, 3)
        runtime = get_runtime(fmt.runtime)(threads=cfg.threads)
        runtime.load(tmp)
        result = check_parity(runtime, images, reference, plan, getattr(cfg, fmt.parity), artifact=fmt.filename)
    except SlimforgeError as e:
        tmp.unlink(missing_ok=True)
        logger.error("%s export failed: %s", fmt.name, e.problem)
        entry.update(status="error", error=e.problem, fix=e.fix, passed=False)
        return entry
    except BaseException:  # a bug or Ctrl-C: leave nothing half-written behind, then let it surface
        tmp.unlink(missing_ok=True)
        raise
    target = final if result.passed else failed
    os.replace(tmp, target)
    entry.update(
        file=target.name,
        status="passed" if result.passed else "failed",
        passed=result.passed,
        bytes=target.stat().st_size,
        sha256=file_sha256(target),
        precision=runtime.precision,
        parity=result.to_dict(),
    )
    if fmt.name in ("onnx", "onnx-int8"):
        entry["opset"] = cfg.opset
    if fmt.name == "onnx-int8":
        entry.update(calibration_images=cfg.calibration_images, int8_activations=cfg.int8_activations)
    if fmt.name == "torchscript":
        entry["frozen"] = cfg.freeze
    return entry


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, cfg: ExportConfig) -> dict[str, Any]:
    """Exports a checkpoint to every format in ``cfg`` and verifies each artifact on validation images.

    Args:
        checkpoint: A slimforge checkpoint directory.
        out_dir: Where artifacts, ``model.json`` and ``export_report.json`` are written (created if needed).
        cfg: Formats, opset and parity tolerances.

    Returns:
        The export report (also written to ``<out_dir>/export_report.json``); ``report["passed"]`` is True only
        when every artifact exported and passed parity.

    Raises:
        ConfigError: ``cfg`` is invalid.
        CheckpointError / DataError: the checkpoint or its validation data cannot be read (nothing is written).
    """
    from slimforge.train.errors import ConfigError

    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, fix="fix the export options")
    checkpoint = Path(checkpoint).resolve()
    model, spec, meta = load_checkpoint(checkpoint)
    data_cfg = data_config_from_meta(meta, cfg.data_overrides, where=str(checkpoint))
    val = ValidationSet(data_cfg, cfg.max_images)
    images = val.images_for(spec)  # [N, C, H, W]
    plan = batch_plan(len(images), cfg.parity.batch_size)
    reference = reference_logits(model, images, plan)  # [N, K]
    logger.info("checking exports of %s on %d validation images, batches %s", spec.name, len(images), plan[:3])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The checkpoint's self-description travels inside every artifact (input size, normalisation, classes,
    # recipe, dataset); model.json is the copy a person reads.
    description = {**meta, "source_checkpoint": str(checkpoint)}
    write_json(out / MODEL_JSON, description)
    inputs = ExportInputs(
        example=images[:2],
        calibration=lambda n: ValidationSet(data_cfg, n, split="train").images_for(spec),
        description=description,
    )
    artifacts = [_export_one(FORMATS[n], model, inputs, images, reference, plan, out, cfg) for n in cfg.formats]
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": now(),
        "checkpoint": str(checkpoint),
        "model": spec.name,
        "model_json": MODEL_JSON,
        "data": asdict(data_cfg),
        "num_images": len(images),
        "batch_plan": sorted(set(plan)),
        "tolerance": {"rtol": cfg.parity.rtol, "min_agreement": cfg.parity.min_agreement},
        "int8_tolerance": {"rtol": cfg.int8_parity.rtol, "min_agreement": cfg.int8_parity.min_agreement},
        "versions": library_versions(),
        "artifacts": artifacts,
        "passed": all(a["passed"] for a in artifacts),
    }
    write_json(out / REPORT, report)
    return report


def failure_message(report: dict[str, Any]) -> str:
    """One line per artifact that did not pass, with its numbers."""
    lines = []
    for a in report["artifacts"]:
        if a["status"] == "failed":
            p = a["parity"]
            limit = "not checked" if p["rtol"] is None else f"limit {p['rtol']:g}"
            lines.append(
                f"{a['format']} artifact FAILED parity (kept as {a['file']}): relative logit diff {p['rel_diff']:.3g} "
                f"(max abs {p['max_abs_diff']:.3g} / logit scale {p['logit_scale']:.3g}, {limit}), "
                f"top-1 agreement {p['top1_agreement']:.4f} (limit {p['min_agreement']:g}) on {p['num_images']} images"
            )
        elif a["status"] == "error":
            lines.append(f"{a['format']} export failed: {a['error']}")
    return "\n".join(lines)
