"""Fake-quantised layers: float modules that compute exactly what the deployed int8 kernels compute.

* :class:`ActivationQuantizer` — per-tensor activation quantisation (uint8 asymmetric or int8 symmetric) with a
  moving min/max observer. Under ``torch.distributed`` the batch min/max is reduced across ranks before it updates
  the range, so every rank holds the same scale as one process that saw the whole global batch.
* :class:`QuantConv2d` — a convolution with its batch norm folded in and its weight quantised to int8 per output
  channel (symmetric). While batch norm trains, the folding is approximate (the convolution runs on the folded,
  quantised weight and is rescaled before a batch norm that uses the batch's statistics, as in Krishnamoorthi
  2018, §3.2); once batch norm is frozen, or in eval mode, the layer is the exact folded convolution.
* :class:`QuantLinear` — the same for a linear layer.

The bias is rounded to the int32 grid the runtime uses (scale = input scale × weight scale), so the fake-quant
model and ONNX Runtime's integer kernels differ only by float rounding order.

Ranges, scales and zero points are buffers: saved in checkpoints and resumable states with the weights. The
switches (observing, batch norm frozen) are plain attributes that the recipe's hooks set as a function of the
optimizer step, so a resumed run sets them again from its step; reading them is never a device sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATION_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
WEIGHT_RANGE = (-127, 127)
"""Symmetric int8 weights: -128 is never used, so the range is symmetric around the zero point 0."""
MIN_SCALE = 1e-8


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class ActivationQuantizer(nn.Module):
    """Fake-quantises a tensor per tensor, observing its range while ``observing`` (training mode only).

    Args:
        activations: ``uint8`` (asymmetric; the zero point places 0 exactly) or ``int8`` (symmetric, zero point 0).
        momentum: Weight of a new batch in the moving min/max.
    """

    def __init__(self, activations: str = "uint8", momentum: float = 0.01) -> None:
        super().__init__()
        self.activations = activations
        self.qmin, self.qmax = ACTIVATION_RANGES[activations]
        self.momentum = momentum
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.observing = True
        """Track the range in training mode (switched off when observers freeze)."""
        self.enabled = True
        """Fake-quantise; off only while calibration collects float activations."""

    @torch.no_grad()
    def set_range(self, low: torch.Tensor | float, high: torch.Tensor | float) -> None:
        """Sets the range and recomputes scale and zero point (the range is widened to hold 0 exactly)."""
        self.min_val.copy_(torch.as_tensor(low, dtype=torch.float32))
        self.max_val.copy_(torch.as_tensor(high, dtype=torch.float32))
        lo, hi = torch.clamp(self.min_val, max=0.0), torch.clamp(self.max_val, min=0.0)
        if self.activations == "int8":
            scale = torch.clamp(torch.maximum(-lo, hi) / 127.0, min=MIN_SCALE)
            zero = torch.zeros_like(self.zero_point)
        else:
            scale = torch.clamp((hi - lo) / float(self.qmax - self.qmin), min=MIN_SCALE)
            zero = torch.clamp(torch.round(self.qmin - lo / scale), self.qmin, self.qmax)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero.to(torch.int32))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Moves the range towards this batch's min/max (the global batch's, across ranks); no device sync."""
        batch = torch.stack([-x.detach().min(), x.detach().max()]).float()
        if _world_size() > 1:  # a collective: every rank runs the same forward, so every rank calls it
            torch.distributed.all_reduce(batch, op=torch.distributed.ReduceOp.MAX)
        low, high = -batch[0], batch[1]
        first = torch.isinf(self.min_val)
        m = self.momentum
        self.set_range(
            torch.where(first, low, self.min_val + m * (low - self.min_val)),
            torch.where(first, high, self.max_val + m * (high - self.max_val)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.observing:
            self.observe(x)
        if not self.enabled:
            return x
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"{self.activations}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 scale of a weight ``[C_out, ...]``: ``max |w| / 127``."""
    return torch.clamp(w.detach().abs().flatten(1).amax(1) / WEIGHT_RANGE[1], min=MIN_SCALE)


def fake_quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to its int8 grid (per output channel), with a straight-through gradient."""
    scale = weight_scale(w)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, *WEIGHT_RANGE)


def fake_quantize_bias(b: torch.Tensor, input_scale: torch.Tensor | None, w_scale: torch.Tensor) -> torch.Tensor:
    """``b`` rounded to the int32 grid ``input_scale × w_scale`` (never clipped), straight-through when trained."""
    if input_scale is None:
        return b
    step = (input_scale * w_scale).detach()
    rounded = torch.round(b / step) * step
    return b + (rounded - b).detach()


class _Quantized(nn.Module):
    """A weighted layer that knows the quantizer feeding it (for the int32 bias grid) without owning it."""

    def __init__(self) -> None:
        super().__init__()
        self._input: list[ActivationQuantizer | None] = [None]  # a list: not registered as a child module

    def set_input_quantizer(self, quantizer: ActivationQuantizer | None) -> None:
        self._input[0] = quantizer

    @property
    def input_scale(self) -> torch.Tensor | None:
        q = self._input[0]
        return q.scale if q is not None and q.enabled else None


class QuantConv2d(_Quantized):
    """``Conv2d`` (+ optional ``BatchNorm2d`` folded in) with an int8 per-channel weight.

    Args:
        conv: The float convolution (kept as ``self.conv``; its parameters keep their meaning).
        bn: The batch norm that followed it, or None.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.bn_frozen = False
        """Use batch norm's running statistics, folded exactly (set when batch norm freezes)."""

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight ``[C_out, C_in/g, kh, kw]`` and bias ``[C_out]`` with batch norm's running statistics folded."""
        w = self.conv.weight
        b = self.conv.bias if self.conv.bias is not None else torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
        if self.bn is None:
            return w, b
        factor = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        return w * factor.reshape(-1, 1, 1, 1), (b - self.bn.running_mean) * factor + self.bn.bias

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None and self.training and not self.bn_frozen:
            # Batch norm still learns: quantise the weight folded with the running statistics, undo the folding
            # on the output, then let batch norm normalise with this batch's statistics (and update its own).
            factor = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
            # A channel whose batch-norm scale is 0 (timm zero-initialises the last one of each residual block)
            # outputs batch norm's bias whatever its weight: fold 1 instead of dividing by 0.
            factor = torch.where(factor == 0, torch.ones_like(factor), factor)
            y = self._conv(x, fake_quantize_weight(self.conv.weight * factor.reshape(-1, 1, 1, 1)), None)
            y = y / factor.reshape(1, -1, 1, 1)
            if self.conv.bias is not None:
                y = y + self.conv.bias.reshape(1, -1, 1, 1)
            return self.bn(y)
        w, b = self.folded()
        return self._conv(x, fake_quantize_weight(w), fake_quantize_bias(b, self.input_scale, weight_scale(w)))

    @torch.no_grad()
    def fold_(self) -> None:
        """Folds batch norm into the convolution for good (the converted, deployable form)."""
        if self.bn is None:
            return
        w, b = self.folded()
        self.conv.weight.copy_(w)
        self.conv.bias = nn.Parameter(b.detach().clone(), requires_grad=self.conv.weight.requires_grad)
        self.bn = None


class QuantLinear(_Quantized):
    """``Linear`` with an int8 per-output-channel weight and a bias on the int32 grid."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.linear.weight
        b = self.linear.bias if self.linear.bias is not None else torch.zeros(w.shape[0], device=w.device)
        return F.linear(x, fake_quantize_weight(w), fake_quantize_bias(b, self.input_scale, weight_scale(w)))


def quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    """Every activation quantizer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer)]


def set_observing_(model: nn.Module, observing: bool) -> None:
    """Starts or stops every activation quantizer's range tracking."""
    for q in quantizers(model):
        q.observing = observing


def freeze_bn_(model: nn.Module) -> None:
    """Makes every :class:`QuantConv2d` use batch norm's running statistics (exact folding) from now on."""
    for m in model.modules():
        if isinstance(m, QuantConv2d):
            m.bn_frozen = True
