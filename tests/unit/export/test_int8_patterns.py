"""Layer patterns where a fake-quant model and its QDQ file could part: all of them in one network, run in ONNX
Runtime as the emulated check does (graph optimisations off) and as deployed (integer kernels)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from slimforge.compress.quantize.calibrate import calibrate_
from slimforge.compress.quantize.fakequant import QuantConv2d, set_observing_
from slimforge.compress.quantize.graph import quantize_graph
from slimforge.compress.quantize.lowering import lower
from slimforge.export.to_onnx import export_onnx

C = 16


def _conv(groups: int = 1, act: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(C, C, 3, padding=1, groups=groups), nn.BatchNorm2d(C), act or nn.ReLU())


class _Patterns(nn.Module):
    """Channel split + concat + shuffle, sigmoid and hard-sigmoid squeeze-excite gates, grouped and depthwise
    convolutions, max / average pooling with ceil mode and without padded counts, a non-global adaptive pool,
    hard-swish, GELU, layer scale and a dropout head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU())
        self.branch = nn.Conv2d(C // 2, C // 2, 3, padding=1)
        self.se = nn.ModuleList([nn.Conv2d(C, 4, 1), nn.Conv2d(4, C, 1), nn.Conv2d(C, 4, 1), nn.Conv2d(4, C, 1)])
        self.grouped, self.depthwise = _conv(4, nn.Hardswish()), _conv(C, nn.GELU())
        self.pools = nn.ModuleList(
            [nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.AvgPool2d(3, 1, 1, count_include_pad=False),
             nn.AvgPool2d(2, 2, ceil_mode=True), nn.AdaptiveAvgPool2d(3)]
        )  # fmt: skip
        self.gamma = nn.Parameter(torch.rand(C) * 1e-2)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(C, 10))

    def _se(self, x: torch.Tensor, i: int, gate) -> torch.Tensor:
        return x * gate(self.se[i + 1](F.relu(self.se[i](x.mean((2, 3), keepdim=True)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pools[0](self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, F.relu(self.branch(b))], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = self._se(self.grouped(x), 0, torch.sigmoid)
        x = self._se(self.pools[1](x), 2, F.hardsigmoid)
        x = x + self.depthwise(x) * self.gamma.reshape(1, -1, 1, 1)
        x = self.pools[3](self.pools[2](x))
        return self.head(torch.flatten(x.mean((2, 3), keepdim=True), 1))


def test_every_pattern_lowers_to_what_the_fake_quant_model_computes(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(48, 3, 15, 15)
    gm, record = quantize_graph(_Patterns().eval(), "uint8", 0.01, skip=[])
    assert record["float_parameters"] == ["gamma"]
    calibrate_(gm, [x], "minmax")
    set_observing_(gm, False)
    for m in gm.modules():
        if isinstance(m, QuantConv2d):
            m.fold_()
    with torch.no_grad():
        ref = gm.eval()(x).numpy()
    path = export_onnx(lower(gm), x[:2], tmp_path / "patterns.int8.onnx")
    emulated = ort.SessionOptions()
    emulated.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for options in (emulated, None):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        rel = np.abs(got - ref).max(1) / np.abs(ref).max(1)
        assert np.median(rel) <= 1e-6 and rel.max() <= 1e-3, (options, np.median(rel), rel.max())
        assert (got.argmax(1) == ref.argmax(1)).all()
