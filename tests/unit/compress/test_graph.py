"""The quantizer placement pass on real timm / torchvision architectures, and the layers it refuses."""

from __future__ import annotations

import operator

import pytest
import timm
import torch
import torchvision
from torch import fx, nn

from slimforge.compress.api import RecipeError
from slimforge.compress.quantize.fakequant import ActivationQuantizer, QuantConv2d, QuantLinear
from slimforge.compress.quantize.graph import ReusedQuantizer, quantize_graph
from slimforge.compress.quantize.lowering import lower


def _quantizer(gm: fx.GraphModule, node: fx.Node) -> bool:
    kinds = (ActivationQuantizer, ReusedQuantizer)
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), kinds)


def _module_nodes(gm: fx.GraphModule, kind: type) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind)]


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: timm.create_model("resnet10t", num_classes=10, in_chans=1), id="timm-resnet10t"),
        pytest.param(lambda: torchvision.models.resnet18(num_classes=10), id="torchvision-resnet18"),
    ],
)
def test_residual_networks_quantize_every_int8_edge(build):
    model = build().eval()
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    gm, record = quantize_graph(model, "uint8", 0.01, skip=[])
    convs = _module_nodes(gm, QuantConv2d)
    assert len(convs) == n_convs == len([n for n in record["layers"] if "fc" not in n])
    assert not _module_nodes(gm, nn.BatchNorm2d)  # every batch norm folded into its convolution
    assert all(gm.get_submodule(n.target).bn is not None for n in convs)
    assert len(_module_nodes(gm, QuantLinear)) == 1
    adds = [n for n in gm.graph.nodes if n.target in (operator.add, operator.iadd, torch.add, "add", "add_")]
    assert adds, "a residual network has adds"
    for n in [*convs, *adds, *_module_nodes(gm, QuantLinear)]:
        # ORT fuses an operation into an integer kernel only when every input arrives quantised.
        assert all(_quantizer(gm, a) for a in n.all_input_nodes), f"{n.name} has a float input"
    for add in adds:  # ... and its output leaves quantised (after the ReLU it is folded with)
        (user,) = add.users
        follower = next(iter(user.users)) if not _quantizer(gm, user) else user
        assert _quantizer(gm, follower), f"{add.name}'s output is not quantised"
    assert not [n for n in gm.graph.nodes if n.op == "output" and _quantizer(gm, n.args[0])]  # logits stay float
    assert record["quantizers"] == len([m for m in gm.modules() if isinstance(m, ActivationQuantizer)])


def test_max_pooling_reuses_its_input_scale():
    gm, _ = quantize_graph(timm.create_model("resnet18", num_classes=10), "uint8", 0.01, skip=[])
    (pool,) = _module_nodes(gm, nn.MaxPool2d)
    (after,) = pool.users
    reused = gm.get_submodule(after.target)
    assert isinstance(reused, ReusedQuantizer)
    assert gm.get_submodule(pool.args[0].target) is reused.source


def test_depthwise_network_with_squeeze_excite_traces_and_lowers_exactly():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=10, in_chans=1).eval()
    gm, record = quantize_graph(model, "uint8", 0.01, skip=[])
    assert record["quantizers"] > 40 and any("conv_dw" in n for n in record["layers"])
    for q in gm.modules():
        if isinstance(q, ActivationQuantizer):
            q.set_range(-4.0, 4.0)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(lower(gm.eval())(x), gm(x))  # the export form computes the same numbers


class _Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.up(self.conv(x)).mean((2, 3)))


def test_a_layer_without_an_int8_kernel_is_refused_by_name_unless_skipped():
    with pytest.raises(RecipeError) as e:
        quantize_graph(_Upsampler(), "uint8", 0.01, skip=[])
    assert "up (ConvTranspose2d)" in e.value.problem and "skip" in e.value.fix
    gm, record = quantize_graph(_Upsampler(), "uint8", 0.01, skip=["up"])
    assert record["layers"] == ["conv", "head"] and isinstance(gm.get_submodule("up"), nn.ConvTranspose2d)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.conv(x)
        return -self.conv(x)


def test_an_untraceable_model_is_refused_with_the_reason():
    with pytest.raises(RecipeError) as e:
        quantize_graph(_Branchy(), "uint8", 0.01, skip=[])
    assert "cannot trace _Branchy" in e.value.problem and "control flow" in e.value.fix


def test_silu_is_split_so_both_halves_run_in_int8():
    """EfficientNet's SiLU becomes x * sigmoid(x) with every input of the sigmoid and the product quantised:
    what ONNX Runtime needs to run QLinearSigmoid + QLinearMul instead of float operations between Q/DQ pairs."""
    model = timm.create_model("efficientnet_b0", num_classes=10, in_chans=1).eval()
    n_silu = sum(isinstance(m, nn.SiLU) for m in model.modules())
    gm, _ = quantize_graph(model, "uint8", 0.01, skip=[])
    assert not _module_nodes(gm, nn.SiLU)
    sigmoids = [n for n in gm.graph.nodes if n.target is torch.sigmoid]
    assert len(sigmoids) >= n_silu
    for n in sigmoids:
        assert all(_quantizer(gm, a) for a in n.all_input_nodes)
        (user,) = n.users
        assert _quantizer(gm, user)  # the gate leaves quantised, into the multiplication
