"""Dropout, drop-path, stochastic depth and layer scale under quantisation: live while training, off in evaluation
and export, and parameters used as activations never observed as activations."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torchvision.ops import StochasticDepth

from slimforge.compress.api import RecipeError
from slimforge.compress.quantize.fakequant import ActivationQuantizer, QuantLinear, set_observing_
from slimforge.compress.quantize.graph import ReusedQuantizer, quantize_graph
from slimforge.compress.quantize.lowering import lower


class _Block(nn.Module):
    """A ConvNeXt-like block: depthwise conv, pointwise MLP, layer scale, drop-path, then a dropout head."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.full((c,), 1e-3))  # layer scale: far below any activation's step
        self.drop_path = DropPath(0.5)
        self.depth = StochasticDepth(0.5, "row")
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = self.pw(F.relu(self.dw(x))) * self.gamma.reshape(1, -1, 1, 1)
        x = x + self.drop_path(y) + self.depth(y)
        x = x.mean((2, 3)) * (x.shape[2] * x.shape[3]) / (x.shape[-1] * x.shape[-2])  # shape arithmetic
        x = F.dropout(x, p=0.5, training=self.training)  # as in timm's heads: recorded with a constant flag
        return self.head(self.drop(x))


def _quantized(model: nn.Module):
    torch.manual_seed(0)
    gm, record = quantize_graph(model, "uint8", 0.01, skip=[])
    for q in gm.modules():
        if isinstance(q, ActivationQuantizer):
            q.set_range(-4.0, 4.0)
    set_observing_(gm, False)  # fixed ranges: what differs between two passes is the regularisers alone
    return gm, record


def test_regularisers_train_like_the_float_model_and_vanish_in_evaluation_and_export():
    gm, record = _quantized(_Block())
    x = torch.randn(16, 1, 8, 8)
    gm.train()
    with torch.no_grad():
        assert not torch.equal(gm(x), gm(x))  # drop-path, stochastic depth and both dropouts are live
        gm.eval()
        first = gm(x)
        assert torch.equal(first, gm(x))
        assert torch.equal(lower(gm)(x), first)  # the export form: regularisers off, the same numbers
    dropouts = [m for m in gm.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 2 and all(m.p == 0.5 for m in dropouts)  # F.dropout became a module of the graph
    head = gm.get_submodule("head")
    assert isinstance(head, QuantLinear) and head.input_scale is not None  # bias on the int32 grid behind dropout


def test_layer_scale_and_shape_arithmetic_get_no_quantizer():
    gm, record = _quantized(_Block())
    assert record["float_parameters"] == ["gamma"]
    seen = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (ActivationQuantizer, ReusedQuantizer)):
            (source,) = n.all_input_nodes
            # not the layer scale (a per-tensor uint8 range of [0, 1e-3] is no activation's range)
            assert source.op != "get_attr" and source.target != "reshape"
            gm.get_submodule(n.target).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        gm.train()(torch.randn(2, 1, 8, 8))
    assert seen and all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in seen)  # activations, never shapes


class _TrainingBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.inner = _Noisy()

    def forward(self, x):
        return self.inner(self.conv(x))


class _Noisy(nn.Module):
    def forward(self, x):
        if self.training:  # a path only training takes, outside a module the trace keeps whole
            return x + 0.1 * torch.randn_like(x)
        return x


def test_a_forward_that_branches_on_training_is_refused_naming_the_layer():
    with pytest.raises(RecipeError) as e:
        quantize_graph(_TrainingBranch(), "uint8", 0.01, skip=[])
    assert "inner" in e.value.problem and "self.training" in e.value.fix


def test_timm_drop_path_and_drop_rate_under_qat():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1, drop_path_rate=0.2, drop_rate=0.5)
    gm, record = _quantized(model)
    plain, _ = _quantized(timm.create_model("resnet10t", num_classes=10, in_chans=1))
    assert record["quantizers"] == sum(isinstance(m, ActivationQuantizer) for m in plain.modules())
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        gm.train()
        gm(x)  # drop-path's mask arithmetic used to get quantizers here: 'int' object has no attribute 'detach'
        gm.eval()
        assert torch.equal(gm(x), gm(x)) and torch.equal(lower(gm)(x), gm(x))
