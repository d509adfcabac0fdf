"""The export form of a fake-quantised model: explicit integer tensors behind quantize/dequantize operations.

``torch.export`` cannot trace ``fake_quantize_per_tensor_affine`` with tensor scales, so :func:`lower` swaps each
fake-quant module for one that computes the same numbers with the ``quantized_decomposed`` operations, which the
ONNX exporter writes as QuantizeLinear / DequantizeLinear:

* activations: Q/DQ with the learned scale and zero point as constants (never re-calibrated);
* weights: the int8 tensor itself (taken from the fake-quantised weight, so the integers are exactly the ones the
  model trained with) behind a per-channel DequantizeLinear;
* biases: int32 on the grid input scale × weight scale behind a DequantizeLinear (ONNX Runtime needs it to fuse
  the final linear layer into QGemm).

The lowered model computes what the fake-quant model computes, up to float rounding ties in the activations.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.compress.quantize.fakequant import (
    WEIGHT_RANGE,
    ActivationQuantizer,
    QuantConv2d,
    QuantLinear,
    fake_quantize_weight,
    weight_scale,
)
from slimforge.compress.quantize.graph import ReusedQuantizer

INT32 = (-(2**31), 2**31 - 1)


def _ops():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed

    return torch.ops.quantized_decomposed


class QDQ(nn.Module):
    """Quantize then dequantize with constant scale and zero point (exports as QuantizeLinear/DequantizeLinear)."""

    def __init__(self, q: ActivationQuantizer) -> None:
        super().__init__()
        self.scale, self.zero_point = float(q.scale), int(q.zero_point)
        self.qmin, self.qmax = q.qmin, q.qmax
        self.dtype = torch.uint8 if q.qmin == 0 else torch.int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _ops()
        args = (self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)
        return ops.dequantize_per_tensor(ops.quantize_per_tensor(x, *args), *args)


class _Int8Weighted(nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor, input_scale: torch.Tensor | None) -> None:
        super().__init__()
        s_w = weight_scale(w)
        shape = (-1,) + (1,) * (w.dim() - 1)
        # The integers of the fake-quantised weight itself: round(w / s) can differ from the kernel's rounding.
        w_q = torch.round(fake_quantize_weight(w.detach()) / s_w.reshape(shape)).clamp(*WEIGHT_RANGE)
        self.register_buffer("w_q", w_q.to(torch.int8))
        self.register_buffer("w_scale", s_w.float())
        self.register_buffer("zeros", torch.zeros_like(s_w, dtype=torch.int32))
        if input_scale is not None:
            step = (input_scale * s_w).float()
            self.register_buffer("b_q", torch.round(b.detach() / step).to(torch.int32))
            self.register_buffer("b_scale", step)
        else:
            self.register_buffer("b_float", b.detach().clone().float())

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        ops = _ops()
        w = ops.dequantize_per_channel(self.w_q, self.w_scale, self.zeros, 0, *WEIGHT_RANGE, torch.int8)
        if hasattr(self, "b_q"):
            b = ops.dequantize_per_channel(self.b_q, self.b_scale, self.zeros, 0, *INT32, torch.int32)
        else:
            b = self.b_float
        return w, b


class Int8Conv2d(_Int8Weighted):
    def __init__(self, m: QuantConv2d) -> None:
        w, b = m.folded()
        super().__init__(w, b, m.input_scale)
        c = m.conv
        self.stride, self.padding, self.dilation, self.groups = c.stride, c.padding, c.dilation, c.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight_and_bias()
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class Int8Linear(_Int8Weighted):
    def __init__(self, m: QuantLinear) -> None:
        w = m.linear.weight
        b = m.linear.bias if m.linear.bias is not None else torch.zeros(w.shape[0])
        super().__init__(w, b, m.input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight_and_bias()
        return F.linear(x, w, b)


@torch.no_grad()
def lower(model: nn.Module) -> nn.Module:
    """A copy of a fake-quantised (converted, eval-mode) model in its export form; ``model`` is not changed.

    Example:
        >>> exportable = lower(quantized.eval())  # doctest: +SKIP
        >>> torch.onnx.export(exportable, (images,), "model.int8.onnx", dynamo=True)  # doctest: +SKIP
    """
    _ops()  # the ops must exist before the ONNX exporter builds its registry, or it has no translation for them
    lowered = copy.deepcopy(model).eval()
    for name, m in list(lowered.named_modules()):
        if isinstance(m, ActivationQuantizer):
            new = QDQ(m)
        elif isinstance(m, ReusedQuantizer):
            new = QDQ(m.source)
        elif isinstance(m, QuantConv2d):
            new = Int8Conv2d(m)
        elif isinstance(m, QuantLinear):
            new = Int8Linear(m)
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(lowered.get_submodule(parent) if parent else lowered, leaf, new)
    return lowered
