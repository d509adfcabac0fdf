"""The graph pass that makes a float CNN fake-quantised, with quantizers exactly where the runtime fuses int8 kernels.

The model is traced with ``torch.fx`` (convolutions, linears, norms, activations and pools are leaves), then:

1. every ``Conv2d`` followed by a ``BatchNorm2d`` becomes one :class:`QuantConv2d` (batch norm folded in), every
   other ``Conv2d`` a :class:`QuantConv2d` without one, every ``Linear`` a :class:`QuantLinear`;
2. an :class:`ActivationQuantizer` goes on every tensor that enters an int8 operation (convolution, linear, add,
   mul, concat, average pooling, sigmoid) and on every such operation's output — after a following ReLU/ReLU6
   when activations are uint8, which the runtime folds into the quantised operation;
3. data-movement operations (max pooling, flatten, reshape, dropout) reuse their input's quantizer, so the runtime
   drops the Q/DQ pair around them instead of converting to float and back;
4. SiLU becomes ``x * sigmoid(x)``, both halves quantised, which ONNX Runtime runs as QLinearSigmoid + QLinearMul
   (left whole it stays a float Sigmoid and Mul between Q/DQ pairs: EfficientNet-B0 ran 1.3× slower that way).

This is the placement ONNX Runtime's QDQ fusion needs: an operation runs as an integer kernel only when each of
its inputs arrives through a DequantizeLinear and its output leaves through a QuantizeLinear. Quantising only
convolution inputs leaves residual adds in float, and every block bounces through FP32 (docs/quantization.md).

Layers that carry multiply-accumulates but have no int8 kernel here (transposed, 1-D or 3-D convolutions,
recurrent layers, embeddings, convolutions with their own weight transform) are refused by name unless listed in
``skip``; a skipped layer stays float, its MACs count against the export's int8 fraction.
"""

from __future__ import annotations

import fnmatch
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from slimforge.compress.api import RecipeError
from slimforge.compress.quantize.fakequant import ActivationQuantizer, QuantConv2d, QuantLinear

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.GELU, nn.Tanh, nn.Identity)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout)
_LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, *_ACTIVATIONS, *_POOLS)
_FOLDABLE = (nn.ReLU, nn.ReLU6)  # a ReLU between an int8 op and its (uint8, zero point 0) quantizer is folded
_PASS_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_PASS_FUNCTIONS = {torch.flatten, F.max_pool2d, "flatten", "view", "reshape", "contiguous"}
_INT8_MODULES = (QuantConv2d, QuantLinear, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Sigmoid)
_INT8_FUNCTIONS = {
    operator.add,
    operator.iadd,
    torch.add,
    operator.mul,
    operator.imul,
    torch.mul,
    torch.cat,
    torch.sigmoid,
    F.adaptive_avg_pool2d,
    F.avg_pool2d,
    "add",
    "add_",
    "mul",
    "mul_",
    "mean",
    "sigmoid",
}
_FUNCTIONAL_WEIGHTED = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, F.linear, F.embedding}
_NO_INT8_KERNEL = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding,
                   nn.EmbeddingBag, nn.RNNBase, nn.MultiheadAttention, nn.Bilinear)  # fmt: skip


class ReusedQuantizer(nn.Module):
    """Applies another quantizer's scale and zero point without observing (after max pooling, flatten, ...)."""

    def __init__(self, source: ActivationQuantizer) -> None:
        super().__init__()
        self._source = [source]  # a list: the source is owned by the graph, not by this module

    @property
    def source(self) -> ActivationQuantizer:
        return self._source[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.source
        if not q.enabled:
            return x
        return torch.fake_quantize_per_tensor_affine(x, q.scale, q.zero_point, q.qmin, q.qmax)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES + _NO_INT8_KERNEL) or super().is_leaf_module(m, qualname)


def _standard_forward(m: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``m`` computes what ``base`` computes (a subclass that overrides forward may transform its weight)."""
    if type(m).forward is base.forward:
        return True
    # timm's Linear only adds a TorchScript branch around F.linear.
    return base is nn.Linear and f"{type(m).__module__}.{type(m).__name__}" == "timm.layers.linear.Linear"


def _split_bn_act(model: nn.Module) -> None:
    """timm's ``BatchNormAct2d`` (batch norm + drop + activation in one module) becomes
    ``Sequential(BatchNorm2d, drop, act)`` so the tracer sees the batch norm and the activation separately."""
    for name, child in list(model.named_children()):
        if type(child).__name__ == "BatchNormAct2d" and isinstance(child, nn.BatchNorm2d):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.load_state_dict({k: v for k, v in child.state_dict().items() if not k.startswith(("act.", "drop."))})
            setattr(model, name, nn.Sequential(bn, child.drop, child.act))
        else:
            _split_bn_act(child)


def _trace(model: nn.Module) -> fx.GraphModule:
    _split_bn_act(model)
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, ... for data-dependent control flow
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RecipeError(
            f"cannot trace {type(model).__name__} with torch.fx to place quantizers: {type(e).__name__}: {first}",
            "quantisation needs a model without data-dependent Python control flow in its forward",
        ) from None
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def _check_layers(gm: fx.GraphModule, skipped) -> None:
    problems = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            bad = isinstance(m, _NO_INT8_KERNEL)
            bad |= isinstance(m, nn.Conv2d) and (not _standard_forward(m, nn.Conv2d) or m.padding_mode != "zeros")
            bad |= isinstance(m, nn.Linear) and not _standard_forward(m, nn.Linear)
            if bad and not skipped(n.target):
                problems.append(f"{n.target} ({type(m).__name__})")
        elif n.op == "call_function" and n.target in _FUNCTIONAL_WEIGHTED:
            problems.append(f"{n.name} (functional {n.target.__name__} inside a module's forward)")
    if problems:
        raise RecipeError(
            "these layers carry multiply-accumulates the int8 backend cannot run (no int8 kernel for their type, "
            f"or a forward that transforms its weight): {', '.join(problems)}",
            "keep them in floating point with the step's `skip` option (fnmatch patterns of the names above), or "
            "replace them with Conv2d / Linear",
        )


def _swap_weighted(gm: fx.GraphModule, skipped) -> list[str]:
    layers = []
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or skipped(n.target):
            continue
        m = gm.get_submodule(n.target)
        if type(m) is nn.BatchNorm2d or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if isinstance(m, nn.Conv2d):
            bn = None
            users = list(n.users)
            if len(users) == 1 and users[0].op == "call_module":
                follower = gm.get_submodule(users[0].target)
                if isinstance(follower, nn.BatchNorm2d) and follower.num_features == m.out_channels:
                    bn = follower
                    users[0].replace_all_uses_with(n)
                    gm.graph.erase_node(users[0])
            gm.add_submodule(n.target, QuantConv2d(m, bn))
        else:
            gm.add_submodule(n.target, QuantLinear(m))
        layers.append(n.target)
    return layers


def _is(gm: fx.GraphModule, n: fx.Node, modules: tuple, functions: set) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), modules)
    return n.op in ("call_function", "call_method") and n.target in functions


def _plan(gm: fx.GraphModule, fold_relu: bool) -> dict[fx.Node, fx.Node | None]:
    """Which nodes' outputs get a quantizer: ``{node: None}`` for an own one, ``{node: source}`` to reuse one."""
    outputs: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "output":
            fx.node.map_arg(n.args, outputs.add)
    plan: dict[fx.Node, fx.Node | None] = {}

    def mark(n: Any) -> None:
        if not isinstance(n, fx.Node) or n in plan or n in outputs or n.op == "get_attr":
            return
        if _is(gm, n, _PASS_MODULES, _PASS_FUNCTIONS) and isinstance(n.args[0], fx.Node):
            source = n.args[0]
            mark(source)
            while plan.get(source) is not None:
                source = plan[source]
            plan[n] = source if source in plan else None
        else:
            plan[n] = None

    for n in list(gm.graph.nodes):
        if not _is(gm, n, _INT8_MODULES, _INT8_FUNCTIONS):
            continue
        for arg in n.all_input_nodes:
            mark(arg)
        out = n
        follower = next(iter(n.users)) if len(n.users) == 1 else None
        if fold_relu and follower is not None and _is(gm, follower, _FOLDABLE, set()):
            out = follower
        mark(out)
    return plan


def quantize_graph(
    model: nn.Module, activations: str, momentum: float, skip: list[str]
) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Traces ``model`` and returns its fake-quantised graph module and what was placed where.

    Args:
        model: The bare float model (its modules are reused, not copied).
        activations: ``uint8`` or ``int8``.
        momentum: The activation observers' moving-average weight.
        skip: fnmatch patterns of layer names kept in floating point.

    Returns:
        ``(graph_module, record)`` with record ``{"layers": [...], "quantizers": n, "skipped": [...]}``.

    Raises:
        RecipeError: the model cannot be traced, or holds layers the backend cannot run in int8.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        >>> gm, record = quantize_graph(net, "uint8", 0.01, skip=[])  # doctest: +SKIP
    """

    def skipped(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in skip)

    gm = _trace(model)
    _check_layers(gm, skipped)
    layers = _swap_weighted(gm, skipped)
    for n in list(gm.graph.nodes):
        if n.op != "call_module":
            continue
        kind = type(gm.get_submodule(n.target))
        if kind is nn.Identity:  # it would separate an operation from its ReLU
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
        elif kind is nn.SiLU:  # x * sigmoid(x): ORT runs both halves as integer kernels once each is quantised
            with gm.graph.inserting_after(n):
                gate = gm.graph.call_function(torch.sigmoid, (n.args[0],))
            with gm.graph.inserting_after(gate):
                product = gm.graph.call_function(operator.mul, (n.args[0], gate))
            n.replace_all_uses_with(product)
            gm.graph.erase_node(n)
    plan = _plan(gm, fold_relu=activations == "uint8")
    owned: dict[fx.Node, str] = {}  # node -> name of the quantizer it owns
    for n in list(gm.graph.nodes):
        if n not in plan:
            continue
        source = plan[n]
        if source is None:
            name = owned[n] = f"act_quant_{len(owned)}"
            gm.add_submodule(name, ActivationQuantizer(activations, momentum))
        else:
            name = f"{owned[source]}_reuse_{n.name}"
            gm.add_submodule(name, ReusedQuantizer(gm.get_submodule(owned[source])))
        with gm.graph.inserting_after(n):
            q = gm.graph.call_module(name, (n,))
        n.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
    for n in gm.graph.nodes:  # the int32 bias grid of each weighted layer is its input quantizer's scale
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (QuantConv2d, QuantLinear)):
            feeder = n.args[0]
            module = gm.get_submodule(feeder.target) if feeder.op == "call_module" else None
            if isinstance(module, ReusedQuantizer):
                module = module.source
            gm.get_submodule(n.target).set_input_quantizer(module if isinstance(module, ActivationQuantizer) else None)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm, {"layers": layers, "quantizers": len(owned), "skipped": list(skip)}
