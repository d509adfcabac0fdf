"""Checkpoint → verified artifacts: the one verb that runs the export formats (:mod:`slimforge.export.formats`).

:func:`export_checkpoint` writes every artifact under a temporary name, runs it against the PyTorch model it
came from on real validation images, and only then publishes it:

* every check passed → renamed to its final name (``model.onnx``, ``model.ts``, ``model.int8.onnx``);
* a check failed → renamed to ``<final name>.failed`` (kept for debugging; no loader picks it up by its suffix);
* export crashed → the temporary file is deleted.

So a file under a final name is always complete and verified. What "verified" means follows the artifact: a
float artifact must reproduce the float logits (``parity``); an int8 one exported from a fake-quant model must
match that model when ONNX Runtime runs the Q/DQ graph as written (``int8.emulated``), agree with it on top-1
when ORT runs its integer kernels (``int8.deployed``), and run at least ``int8.min_int8_mac_fraction`` of its
multiply-accumulates in those kernels. The formats default to what the checkpoint's recipe says it is: a
quantised checkpoint exports as QDQ int8, never against the float 1e-4 gate.

``export_report.json`` records every artifact's numbers; every artifact carries the checkpoint's model
description (``model.json`` is the copy a person reads).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from slimforge.export.description import MODEL_JSON
from slimforge.export.evaldata import ValidationSet, data_config_from_meta
from slimforge.export.formats import FORMATS, ArtifactFormat, ExportInputs, available_formats
from slimforge.export.machine import library_versions
from slimforge.export.report import now, write_json
from slimforge.export.runtimes import get_runtime
from slimforge.export.to_onnx import MIN_OPSET
from slimforge.export.verify import ParityConfig, batch_plan, check_parity, reference_logits
from slimforge.train.checkpoint import file_sha256, load_checkpoint
from slimforge.train.config import at_least
from slimforge.train.errors import ConfigError, ExportError, SlimforgeError, check_writable

logger = logging.getLogger(__name__)

REPORT = "export_report.json"
REPORT_FORMAT = "slimforge.export"
REPORT_VERSION = 2
FAILED_SUFFIX = ".failed"


@dataclass
class Int8Config:
    """How int8 artifacts are made (``onnx-int8``, ``onnx-int8-ort``) and judged (every int8 format)."""

    calibrator: Literal["minmax", "percentile", "entropy"] = "minmax"
    """Post-training quantisation: how activation ranges are chosen from the calibration images."""
    percentile: float = 99.99
    """percentile calibrator: the percentage of values kept inside the range."""
    calibration_images: int = 256
    """Post-training quantisation: training images (evaluation transform) the ranges are calibrated on."""
    backend: Literal["ort-cpu", "tensorrt"] = "ort-cpu"
    """Post-training quantisation: the runtime the int8 model is for (decides the activation type)."""
    activations: Literal["uint8", "int8"] | None = None
    """Post-training quantisation: activation type; null takes the backend's (uint8 for ort-cpu)."""
    min_int8_mac_fraction: float = 0.95
    """An int8 artifact fails when a smaller share of its convolution / matmul MACs runs in integer kernels in
    ONNX Runtime's optimised graph (MAC-weighted)."""
    emulated: ParityConfig = field(default_factory=lambda: ParityConfig(rtol=1e-3, min_agreement=0.99, quantile=0.5))
    """ORT with graph optimisations off (the Q/DQ graph as written) vs the fake-quant PyTorch model: the same
    arithmetic, so the median image's logits must agree to 1e-3 of their scale (most agree exactly); an image may
    differ more where one activation sits on a rounding tie the two libraries break differently."""
    deployed: ParityConfig = field(default_factory=lambda: ParityConfig(rtol=None, min_agreement=0.99))
    """ORT's optimised session (integer kernels) vs the fake-quant model: top-1 agreement."""
    versus_float: ParityConfig = field(default_factory=lambda: ParityConfig(rtol=None, min_agreement=0.9))
    """ONNX Runtime's own quantisers (no fake-quant model exists): top-1 agreement with the float model."""

    def validate(self) -> list[str]:
        p = [f"{name}.{x}" for name in ("emulated", "deployed", "versus_float") for x in getattr(self, name).validate()]
        p += at_least(self, 1, "calibration_images")
        if not 0 <= self.min_int8_mac_fraction <= 1:
            p.append(f"min_int8_mac_fraction: {self.min_int8_mac_fraction} must be in [0, 1]")
        if not 50 < self.percentile <= 100:
            p.append(f"percentile: {self.percentile} must be in (50, 100]")
        from slimforge.compress.quantize.config import PTQConfig

        p += PTQConfig(backend=self.backend, activations=self.activations).validate()
        return p


@dataclass
class ExportConfig:
    """What to export and how strictly to check it."""

    formats: list[str] | None = None
    """Registered format names (:func:`slimforge.export.formats.available_formats`); null: the checkpoint's own,
    ``onnx`` + ``torchscript`` for a float checkpoint, ``onnx-qdq`` + ``torchscript`` for a quantised one."""
    opset: int = 18
    """ONNX opset (>= 17)."""
    freeze: bool = True
    """TorchScript: ``torch.jit.freeze`` the traced module (weights become constants, BatchNorm folded)."""
    max_images: int | None = 512
    """Validation images the checks run on; ``None`` uses the whole validation split."""
    data_overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of the checkpoint's recorded DataConfig (or a full description when it has none)."""
    threads: int | None = None
    """CPU threads of the checking runtimes; ``None``: all usable cores."""
    parity: ParityConfig = field(default_factory=ParityConfig)
    """Tolerances of the formats meant to reproduce the checkpoint's logits (onnx, torchscript)."""
    int8: Int8Config = field(default_factory=Int8Config)
    """How int8 artifacts are made and judged."""
    allow_factory: bool = False
    """Export a checkpoint whose architecture is a user factory: rebuilding it imports and runs the Python function
    its ``slimforge.json`` names (``--allow-factory``)."""

    def validate(self) -> list[str]:
        p = [f"parity.{x}" for x in self.parity.validate()]
        p += [f"int8.{x}" for x in self.int8.validate()]
        unknown = [f for f in self.formats or [] if f not in FORMATS]
        if unknown:
            p.append(f"formats: unknown {unknown}; choose from {', '.join(available_formats())}")
        if self.formats is not None and not self.formats:
            p.append("formats: name at least one format")
        if self.opset < MIN_OPSET:
            p.append(f"opset: {self.opset} must be >= {MIN_OPSET}")
        if self.max_images is not None and self.max_images < 2:
            p.append(f"max_images: {self.max_images} must be >= 2 (two batch sizes are checked)")
        return p


def _tolerance(cfg: ExportConfig, dotted: str) -> ParityConfig:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def formats_for(cfg: ExportConfig, quantized: bool, where: str) -> list[str]:
    """The formats to export: the configured ones, checked against the checkpoint's kind, or its defaults.

    Raises:
        ConfigError: a format does not fit the checkpoint (a float format for a quantised one, or the reverse).
    """
    if cfg.formats is None:
        return ["onnx-qdq", "torchscript"] if quantized else ["onnx", "torchscript"]
    problems = []
    for name in cfg.formats:
        needs = FORMATS[name].checkpoint
        if needs == "float" and quantized:
            problems.append(
                f"formats: {name} exports a float model, and {where} is quantised (its recipe has a qat/ptq step): "
                "its ONNX export is the int8 QDQ graph with the learned scales, format onnx-qdq"
            )
        elif needs == "quantized" and not quantized:
            problems.append(
                f"formats: {name} exports a quantised checkpoint's learned scales, and {where} is a float model: "
                "use onnx-int8 (post-training quantisation), or train with a qat step first"
            )
    if problems:
        raise ConfigError(problems, fix="drop --formats to export what the checkpoint is, or pick a fitting format")
    return list(cfg.formats)


def _check_runtime(name: str, backend: str):
    """The runtime a check runs in: an int8 file for TensorRT is deployed-checked in TensorRT, not ORT's CPU kernels
    (its emulated check runs Q/DQ as written, which is the same on every backend)."""
    if backend == "tensorrt" and name == "ort-cpu":
        from slimforge.export.runtimes import runtime_class

        ok, why = runtime_class("ort-tensorrt").available()
        if not ok:
            raise ExportError(
                f"this int8 file targets TensorRT (backend: tensorrt) and its deployed check runs in TensorRT, which "
                f"is not available here: {why}",
                "export it on the machine that deploys it (a GPU with TensorRT), or quantise with backend: ort-cpu",
            )
        name = "ort-tensorrt"
    return get_runtime(name)


def _recorded_backend(recipe: list[dict[str, Any]], cfg: ExportConfig) -> str:
    """The backend a quantised checkpoint was made for (its last quantisation step's record), else the configured."""
    for step in reversed(recipe):
        backend = (step.get("record") or {}).get("backend")
        if backend:
            return backend
    return cfg.int8.backend


def _publish(tmp: Path, final: Path, passed: bool) -> Path:
    target = final if passed else final.with_name(final.name + FAILED_SUFFIX)
    os.replace(tmp, target)
    return target


def _export_one(
    fmt: ArtifactFormat,
    model: nn.Module,
    inputs: ExportInputs,
    images: torch.Tensor,
    reference: np.ndarray,
    plan: list[int],
    out: Path,
    cfg: ExportConfig,
    backend: str = "ort-cpu",
) -> dict[str, Any]:
    final = out / fmt.filename
    failed = final.with_name(final.name + FAILED_SUFFIX)
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")
    # A previous run's artifact would look like this run's output: remove it before anything can fail.
    for stale in (final, failed, tmp):
        stale.unlink(missing_ok=True)
    entry: dict[str, Any] = {"format": fmt.name, "file": None, "status": "error", **fmt.options(cfg)}
    start = time.perf_counter()
    try:
        quantized = fmt.exporter(model, inputs, tmp, cfg)
        entry["export_seconds"] = round(time.perf_counter() - start, 3)
        quantized_reference = reference if quantized is None else reference_logits(quantized, images, plan)
        results, deployed = {}, None
        for check in fmt.checks:
            runtime = _check_runtime(check.runtime, backend)(threads=cfg.threads)
            runtime.load(tmp)
            ref = quantized_reference if check.reference == "quantized" else reference
            results[check.name] = check_parity(
                runtime, images, ref, plan, _tolerance(cfg, check.tolerance), fmt.filename
            )
            if deployed is None or check.name == "deployed":
                deployed = runtime
    except SlimforgeError as e:
        tmp.unlink(missing_ok=True)
        logger.error("%s export failed: %s", fmt.name, e.problem)
        entry.update(status="error", error=e.problem, fix=e.fix, passed=False)
        return entry
    except BaseException:  # a bug or Ctrl-C: leave nothing half-written behind, then let it surface
        tmp.unlink(missing_ok=True)
        raise
    fraction = deployed.details.get("int8_mac_fraction")
    mac_gate = fmt.mac_gate and backend == "ort-cpu"  # counted from ONNX Runtime's CPU graph: its kernels only
    mac_ok = not mac_gate or (fraction is not None and fraction >= cfg.int8.min_int8_mac_fraction)
    passed = all(r.passed for r in results.values()) and mac_ok
    target = _publish(tmp, final, passed)
    entry.update(
        file=target.name,
        status="passed" if passed else "failed",
        passed=passed,
        bytes=target.stat().st_size,
        sha256=file_sha256(target),
        runtime=deployed.name,
        precision=deployed.precision,
        parity=next(iter(results.values())).to_dict(),
        checks={name: r.to_dict() for name, r in results.items()},
    )
    if "int8_mac_fraction" in deployed.details:
        entry.update(
            int8_mac_fraction=fraction,
            int8_macs=deployed.details.get("int8_macs"),
            min_int8_mac_fraction=cfg.int8.min_int8_mac_fraction if mac_gate else None,
        )
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
        SlimforgeError: ``out_dir`` cannot be written (checked before any work).
        CheckpointError / DataError: the checkpoint or its validation data cannot be read, holds non-finite values,
            or is a user-factory model without ``cfg.allow_factory`` (nothing is written).
    """
    from slimforge.compress.api import is_quantized

    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, fix="fix the export options")
    check_writable(out_dir, "output folder")
    checkpoint = Path(checkpoint).resolve()
    model, spec, meta = load_checkpoint(checkpoint, allow_factory=cfg.allow_factory, opt_in="pass --allow-factory")
    formats = formats_for(cfg, is_quantized(spec.recipe), f"checkpoint {checkpoint}")
    data_cfg = data_config_from_meta(meta, cfg.data_overrides, where=str(checkpoint))
    val = ValidationSet(data_cfg, cfg.max_images)
    images = val.images_for(spec)  # [N, C, H, W]
    plan = batch_plan(len(images), cfg.parity.batch_size)
    reference = reference_logits(model, images, plan)  # [N, K]
    logger.info("checking exports of %s on %s (validation), batches %s", spec.name, val.coverage, plan[:3])

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
    backend = _recorded_backend(spec.recipe, cfg)
    artifacts = [_export_one(FORMATS[n], model, inputs, images, reference, plan, out, cfg, backend) for n in formats]
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": now(),
        "checkpoint": str(checkpoint),
        "model": spec.name,
        "model_json": MODEL_JSON,
        "data": asdict(data_cfg),
        "num_images": len(images),
        "coverage": val.coverage,
        "batch_plan": sorted(set(plan)),
        "recipe": [step["method"] for step in spec.recipe],
        "settings": asdict(cfg),
        "versions": library_versions(),
        "artifacts": artifacts,
        "passed": all(a["passed"] for a in artifacts),
    }
    write_json(out / REPORT, report)
    return report


def failure_message(report: dict[str, Any]) -> str:
    """One line per failed check of every artifact that did not pass, with its numbers."""
    lines = []
    for a in report["artifacts"]:
        if a["status"] == "failed":
            for name, p in a["checks"].items():
                if p["passed"]:
                    continue
                limit = "not checked" if p["rtol"] is None else f"limit {p['rtol']:g}"
                if p["rtol"] is not None and p.get("quantile", 1.0) < 1.0:
                    limit = f"{p['quantile']:.0%} quantile {p['rel_diff_at_quantile']:.3g}, {limit}"
                lines.append(
                    f"{a['format']} artifact FAILED its {name} check (kept as {a['file']}): relative logit diff "
                    f"{p['rel_diff']:.3g} (max abs {p['max_abs_diff']:.3g} / logit scale {p['logit_scale']:.3g}, "
                    f"{limit}), top-1 agreement {p['top1_agreement']:.4f} (limit {p['min_agreement']:g}) on "
                    f"{p['num_images']} images [{p['runtime']}]"
                )
            fraction, minimum = a.get("int8_mac_fraction"), a.get("min_int8_mac_fraction")
            if minimum is not None and (fraction is None or fraction < minimum):
                floats = ", ".join((a.get("int8_macs") or {}).get("float_layers", [])[:5])
                lines.append(
                    f"{a['format']} artifact FAILED the int8 gate (kept as {a['file']}): "
                    f"{'unknown' if fraction is None else f'{fraction:.1%}'} of its conv/matmul MACs run in integer "
                    f"kernels (minimum {minimum:.0%}); float layers: {floats or 'unknown'}"
                )
        elif a["status"] == "error":
            lines.append(f"{a['format']} export failed: {a['error']}")
    return "\n".join(lines)
