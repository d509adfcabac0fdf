"""The quantisation recipe methods: ``qat`` (train with fake quantisation) and ``ptq`` (calibrate, no training).

Both put the same quantizers in the same places (:mod:`slimforge.compress.quantize.graph`) and end in the same
converted form — batch norm folded into int8 per-channel weights, activation ranges frozen — which
:func:`slimforge.compress.quantize.lowering.lower` turns into a QDQ graph for ONNX Runtime.

Example:
    A distillation config that fine-tunes a trained FP32 student with fake quantisation, the teacher guiding::

        model: {checkpoint: runs/student/checkpoint}
        compress:
          - {method: qat, freeze_observers_step: 100, freeze_bn_step: 150}
"""

from __future__ import annotations

import copy

from torch import nn

from slimforge.compress.api import CompressionContext, Method, RecipeError, register_method
from slimforge.compress.quantize.calibrate import calibrate_
from slimforge.compress.quantize.config import PTQConfig, QATConfig, QuantConfig
from slimforge.compress.quantize.fakequant import QuantConv2d, freeze_bn_, set_observing_
from slimforge.compress.quantize.graph import quantize_graph


def _calibration_batches(ctx: CompressionContext, n: int) -> list:
    if ctx.batches is None:
        raise RecipeError(
            "0 calibration images: this run gives the quantizer no training images to set its ranges from",
            "run the step where training data is available (train/train.py, train/distill.py or an export)",
        )
    return list(ctx.batches(n))


class _Quantize(Method):
    quantizes = True
    config: QuantConfig

    def _graph(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        momentum = getattr(cfg, "observer_momentum", 0.01)
        gm, placed = quantize_graph(model, cfg.activation_type(), momentum, cfg.skip)
        if self.record and (self.record.get("layers"), self.record.get("quantizers")) != (
            placed["layers"],
            placed["quantizers"],
        ):
            raise RecipeError(
                f"this model traces to {placed['quantizers']} quantizers on {len(placed['layers'])} layers, the "
                f"checkpoint recorded {self.record.get('quantizers')} on {len(self.record.get('layers', []))}: the "
                "architecture or the library that builds it changed since the checkpoint was written",
                "load it with the timm/torchvision version recorded in its slimforge.json",
            )
        self.record.update(placed, backend=cfg.backend, activations=cfg.activation_type())
        return gm

    def check_model(self, model: nn.Module) -> None:
        cfg = self.config
        quantize_graph(copy.deepcopy(model), cfg.activation_type(), 0.01, cfg.skip)  # layers, traceability

    def check_topology(
        self, distributed_type: str, zero_stage: int | None, weight_dtype: str = "float32"
    ) -> str | None:
        if "FSDP" in distributed_type or zero_stage == 3:
            return (
                f"{self.name} folds batch norm into each convolution's weight inside that layer's forward, and "
                "ZeRO-3 / FSDP shard those weights outside it"
            )
        if weight_dtype != "float32":
            return (
                f"DeepSpeed's mixed precision would hold the quantizers' scales, zero points and observed ranges in "
                f"{weight_dtype}, so the trained scales would not be those of the exported int8 model (use "
                "train.mixed_precision=bf16 or no)"
            )
        return None

    def convert(self, model: nn.Module) -> None:
        set_observing_(model, False)
        for m in model.modules():
            if isinstance(m, QuantConv2d):
                m.fold_()
        self.record["stage"] = "converted"

    def rebuild(self, model: nn.Module) -> nn.Module:
        model = self._graph(model)
        if self.record.get("stage") == "converted":
            self.convert(model)
        return model


@register_method("qat", QATConfig)
class QuantizationAwareTraining(_Quantize):
    """Fake-quantised training: ranges start from calibration images and track the batches until frozen."""

    config: QATConfig

    def prepare(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        model = self._graph(model)
        images = calibrate_(model, _calibration_batches(ctx, self.config.calibration_images), "minmax")
        self.record.update(calibration_images=images, stage="prepared")
        self.on_step(model, 0)
        return model

    def on_step(self, model: nn.Module, step: int) -> None:
        cfg = self.config
        set_observing_(model, cfg.freeze_observers_step is None or step < cfg.freeze_observers_step)
        if cfg.freeze_bn_step is not None and step >= cfg.freeze_bn_step:
            freeze_bn_(model)


@register_method("ptq", PTQConfig)
class PostTrainingQuantization(_Quantize):
    """Ranges calibrated once on real images; the model is converted at once (batch norm folded, ranges fixed)."""

    config: PTQConfig

    def prepare(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        cfg = self.config
        model = self._graph(model)
        batches = _calibration_batches(ctx, cfg.calibration_images)
        images = calibrate_(model, batches, cfg.calibrator, cfg.percentile)
        self.record.update(calibration_images=images, calibrator=cfg.calibrator)
        self.convert(model)
        return model
