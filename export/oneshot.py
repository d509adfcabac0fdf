"""One-shot compression of a checkpoint, and what it changed: parameters, MACs, file size (plain and zlib-compressed)
and ONNX Runtime latency, before and after, measured side by side.

The steps are the training recipe's (``compress: [...]`` in a config file): methods that need no training (``prune``,
``lowrank``, ``sparsity``, ``ptq``) run here on the checkpoint's recorded data; ``qat`` trains, so it belongs to
``train/distill.py``. The compressed checkpoint records its steps like any trained one, so recovery is
``train/distill.py`` with it as the student (``model.checkpoint``), and export and benchmark take it as it is.

Latency: both models are exported to ONNX (FP32; a ``ptq`` result as its int8 QDQ file) and timed in ONNX Runtime
on the CPU at batch 1, in interleaved rounds (each round the median of ``runs`` calls, the result the median over
rounds), so a change of the machine's speed state during the measurement affects both alike.

File size: the safetensors weights as stored, and after zlib at level 6 (gzip's default), measured by compressing
them. Unstructured ``sparsity`` shows in the second only: its zeros compress, while the dense tensors keep their size
and dense kernels still multiply the zeros; the report says so when a ``sparsity`` step ran.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimforge.train.errors import SlimforgeError

TRAINING_METHODS = ("qat",)
SPARSITY_NOTE = (
    "Unstructured sparsity shrinks the compressed checkpoint (zlib MB), not dense-runtime latency: the tensors keep "
    "their shape and dense kernels still multiply the zeros, so parameters, MACs and ORT ms do not fall with it."
)


@dataclass
class OneShotConfig:
    """A one-shot compression run: ``configs/compress/*.yaml``."""

    compress: list[dict[str, Any]] = field(default_factory=list)
    """The steps, as in a training config: ``[{method: prune, macs: 0.5}, ...]``; applied in order."""
    calibration_images: int = 256
    """Real training images (the checkpoint's recorded dataset) the steps may use (calibration, Taylor ranking)."""
    rounds: int = 5
    """Interleaved latency rounds."""
    runs: int = 50
    """Batch-1 calls per model per round."""
    threads: int | None = None
    """ONNX Runtime intra-op threads; null: every usable core."""

    def validate(self) -> list[str]:
        from slimforge.train.config import at_least
        from slimforge.train.recipe import step_problems

        p = [f"compress{q}" for q in step_problems(self.compress)]
        if not self.compress:
            p.append("compress: give at least one step, e.g. [{method: prune, macs: 0.5}]")
        trains = [s.get("method") for s in self.compress if isinstance(s, dict) and s.get("method") in TRAINING_METHODS]
        if trains:
            p.append(f"compress: {trains[0]!r} trains the model: use it in train/distill.py's compress steps")
        for i, s in enumerate(self.compress):
            if isinstance(s, dict) and s.get("method") == "sparsity" and s.get("end_step") is not None:
                p.append(
                    f"compress[{i}].end_step: one-shot compression has no training updates to schedule sparsity "
                    "over (it is applied at once): remove end_step, or schedule it in train/distill.py"
                )
        return p + at_least(self, 1, "calibration_images", "rounds", "runs", "threads")


def interleaved_latency(
    files: dict[str, Path], input_shape: tuple[int, ...], rounds: int, runs: int, threads: int | None
) -> dict[str, float]:
    """Median batch-1 milliseconds per ONNX file in ONNX Runtime (CPU): the median over interleaved rounds of each
    round's median of ``runs`` calls."""
    from slimforge.export.measure import time_forward
    from slimforge.export.runtimes import get_runtime

    sessions = {}
    for key, path in files.items():
        sessions[key] = get_runtime("ort-cpu")(threads=threads)
        sessions[key].load(path)
    image = np.random.default_rng(0).standard_normal((1, *input_shape), dtype=np.float32)
    per_round: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(rounds):
        for key, rt in sessions.items():
            per_round[key].append(1e3 * float(np.median(time_forward(rt, image, runs, warmup=10))))
    return {k: statistics.median(v) for k, v in per_round.items()}


def zlib_mb(checkpoint: Path) -> float:
    """MB of a checkpoint's safetensors weights after zlib level 6 (gzip's default level, without its few header
    bytes), measured by compressing them in 16 MiB chunks."""
    size = 0
    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        packer = zlib.compressobj(6)
        with open(path, "rb") as f:
            while chunk := f.read(16 * 2**20):
                size += len(packer.compress(chunk))
        size += len(packer.flush())
    return size / 2**20


def _onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, quantized: bool) -> Path:
    """The model as the ONNX file ONNX Runtime would deploy (int8 QDQ for a quantised one)."""
    from slimforge.export.to_onnx import export_onnx

    if quantized:
        from slimforge.compress.quantize.lowering import lower

        model = lower(model)
    return export_onnx(model.eval(), example, path)


def compress_checkpoint(checkpoint: str | os.PathLike, cfg: OneShotConfig, out: str | os.PathLike,
                        allow_factory: bool = False) -> dict[str, Any]:  # fmt: skip
    """Applies ``cfg.compress`` to ``checkpoint``, writes ``out/checkpoint``, and measures both models.

    Returns:
        ``{"before": {...}, "after": {...}, "ratios": {...}, "recipe": [...], "notes": [...]}`` with ``params``,
        ``macs``, ``file_mb``, ``zlib_mb`` (the weights after zlib level 6) and ``ort_ms`` (batch 1) per side, and
        the sentences the table is printed with; also written to ``out/compress_report.json``.

    Raises:
        SlimforgeError: the checkpoint cannot be loaded, a step cannot apply, or the output cannot be written.
    """
    from slimforge.compress.api import CompressionContext, RecipeError, is_quantized
    from slimforge.compress.stats import count_macs, count_parameters
    from slimforge.export.evaldata import ValidationSet, data_config_from_meta
    from slimforge.export.report import write_json
    from slimforge.train.checkpoint import load_checkpoint, save_checkpoint
    from slimforge.train.errors import check_writable
    from slimforge.train.recipe import build_methods

    out = Path(out)
    check_writable(out, "--out")
    model, spec, meta = load_checkpoint(checkpoint, allow_factory=allow_factory, opt_in="pass --allow-factory")
    original = copy.deepcopy(model)  # the "before" side; the steps change ``model`` in place
    images = ValidationSet(data_config_from_meta(meta), cfg.calibration_images, split="train").images_for(spec)
    ctx = CompressionContext(example_input=images[:1], batches=lambda n: iter(images[:n].split(32)))
    methods = build_methods(cfg.compress)
    try:
        for m in methods:
            m.check_model(model)
            model = m.prepare(model, ctx)
        for m in methods:
            m.convert(model)
    except RecipeError as e:
        raise SlimforgeError(f"compress step: {e.problem}", e.fix) from None
    model.eval()
    spec.recipe = list(spec.recipe) + [m.step_record() for m in methods]
    extra = {**meta.get("extra", {}), "compressed_from": str(checkpoint)}
    saved = save_checkpoint(model.state_dict(), spec, out / "checkpoint", extra=extra)

    sides = {"before": (original.eval(), Path(checkpoint)), "after": (model, saved)}
    report: dict[str, Any] = {"recipe": [s["method"] for s in spec.recipe]}
    with tempfile.TemporaryDirectory() as tmp:
        quantized = {"before": is_quantized(spec.recipe[: -len(methods)]), "after": is_quantized(spec.recipe)}
        files = {k: _onnx(m, images[:2], Path(tmp) / f"{k}.onnx", quantized[k]) for k, (m, _) in sides.items()}
        latency = interleaved_latency(files, tuple(spec.input_size), cfg.rounds, cfg.runs, cfg.threads)
    for k, (m, path) in sides.items():
        report[k] = {
            "params": count_parameters(m),
            "macs": count_macs(m, spec.input_size),
            "file_mb": sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**20,
            "zlib_mb": zlib_mb(Path(path)),
            "ort_ms": latency[k],
        }
    keys = ("params", "macs", "file_mb", "zlib_mb", "ort_ms")
    report["ratios"] = {k: report["after"][k] / report["before"][k] for k in keys}
    report["notes"] = [
        f"sparsity: {m.record['overall']:.1%} of the pruned layers' weights are zero. {SPARSITY_NOTE}"
        for m in methods
        if m.name == "sparsity"
    ]
    report["config"] = dataclasses.asdict(cfg)
    write_json(out / "compress_report.json", report)
    return report


def report_table(report: dict[str, Any]) -> str:
    """The before/after figures as a Markdown table, then the report's notes (one paragraph each)."""
    rows = [("parameters", "params", "{:,.0f}"), ("MACs (batch 1)", "macs", "{:,.0f}"),
            ("checkpoint MB", "file_mb", "{:.2f}"), ("checkpoint MB, zlib -6", "zlib_mb", "{:.2f}"),
            ("ORT CPU ms (batch 1)", "ort_ms", "{:.3f}")]  # fmt: skip
    lines = ["| | before | after | after / before |", "|---|---|---|---|"]
    for label, key, fmt in rows:
        b, a = report["before"][key], report["after"][key]
        lines.append(f"| {label} | {fmt.format(b)} | {fmt.format(a)} | {a / b:.3f} |")
    for note in report.get("notes", []):
        lines += ["", note]
    return "\n".join(lines)
