"""Tracing a float model for quantisation so that the traced graph trains and evaluates as the float model does.

Regularisers that behave differently in training and in evaluation (dropout, timm's ``DropPath`` and ``DropBlock2d``,
torchvision's ``StochasticDepth``) must stay live in the graph: active while QAT trains, identities in evaluation
and in every export. ``torch.fx`` records Python control flow once, in whatever mode the model is in when traced,
so:

* the model is traced in **evaluation mode** (no random mask, no shape arithmetic of a drop-path mask in the graph);
* those regularisers are **leaf modules** of the trace, called as modules that read ``self.training`` at run time;
* functional dropout (``F.dropout(x, p, training=self.training)`` in timm's heads) is recorded with a constant
  ``training`` flag, so each such call becomes an ``nn.Dropout(p)`` module of the graph;
* the model is traced a second time in training mode; if the two graphs still differ, a forward branches on
  ``self.training`` outside such a module, and the model is refused naming the layer (one of the two paths would
  be lost).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from slimforge.compress.api import RecipeError

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_STOCHASTIC_NAMES = {
    "timm.layers.drop.DropPath",
    "timm.layers.drop.DropBlock2d",
    "torchvision.ops.stochastic_depth.StochasticDepth",
}
_FUNCTIONAL_DROPOUT = {
    F.dropout: nn.Dropout,
    F.dropout1d: nn.Dropout1d,
    F.dropout2d: nn.Dropout2d,
    F.dropout3d: nn.Dropout3d,
    F.alpha_dropout: nn.AlphaDropout,
    torch.dropout: nn.Dropout,
}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda"}


def is_stochastic(m: nn.Module) -> bool:
    """Whether ``m`` is a regulariser that is random in training and the identity in evaluation."""
    return isinstance(m, _DROPOUT) or f"{type(m).__module__}.{type(m).__name__}" in _STOCHASTIC_NAMES


def stochastic_node(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether node ``n`` calls such a regulariser (kept as a module of the graph)."""
    return n.op == "call_module" and is_stochastic(gm.get_submodule(n.target))


def through_stochastic(gm: fx.GraphModule, n: object) -> object:
    """The node a chain of regularisers starting at ``n`` reads (``n`` itself when it is none)."""
    while isinstance(n, fx.Node) and stochastic_node(gm, n):
        n = n.args[0]
    return n


def _dropout_modules(gm: fx.GraphModule) -> None:
    """Turns every functional dropout call into an ``nn.Dropout`` submodule call (its ``training`` flag follows the
    graph module's mode from then on instead of the mode it was traced in)."""
    for i, n in enumerate(list(gm.graph.nodes)):
        kind = _FUNCTIONAL_DROPOUT.get(n.target) if n.op == "call_function" else None
        if kind is None:
            continue
        p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
        name = f"dropout_{i}"
        gm.add_submodule(name, kind(float(p)))
        with gm.graph.inserting_after(n):
            call = gm.graph.call_module(name, (n.args[0],))
        n.replace_all_uses_with(call)
        gm.graph.erase_node(n)
    gm.graph.lint()


def _signature(gm: fx.GraphModule) -> list[tuple[str, str, str, fx.Node]]:
    out = []
    for n in gm.graph.nodes:
        args = fx.node.map_arg((n.args, n.kwargs), lambda a: a.name)
        out.append((n.op, str(n.target), repr(args), n))
    return out


def _owner(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), None) if stack else None
    name = path[0] if isinstance(path, tuple) else path
    return f"{name!s} ({n.name})" if name else n.name


def trace(model: nn.Module, tracer_class: type[fx.Tracer]) -> fx.GraphModule:
    """Traces ``model`` in evaluation mode with its regularisers kept as modules; the graph module comes back in the
    model's mode.

    Raises:
        RecipeError: the model cannot be traced, or its forward takes another path in training than in evaluation
            outside a module the trace keeps whole.
    """
    was = model.training
    graphs = {}
    try:
        for mode in (False, True):
            model.train(mode)
            try:
                graph = tracer_class().trace(model)
            except Exception as e:  # fx raises TraceError, TypeError, ... for data-dependent control flow
                if mode:  # evaluation traced; training did not: the forward branches on self.training
                    graphs[mode] = None
                    continue
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise RecipeError(
                    f"cannot trace {type(model).__name__} with torch.fx to place quantizers: {type(e).__name__}: "
                    f"{first}",
                    "quantisation needs a model without data-dependent Python control flow in its forward",
                ) from None
            gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
            _dropout_modules(gm)
            graphs[mode] = gm
    finally:
        model.train(was)
    evaluation, training = graphs[False], graphs[True]
    if training is None or [s[:3] for s in _signature(training)] != [s[:3] for s in _signature(evaluation)]:
        where = "its forward"
        if training is not None:
            for a, b in zip(_signature(evaluation), _signature(training), strict=False):
                if a[:3] != b[:3]:
                    where = _owner(b[3])
                    break
        raise RecipeError(
            f"{type(model).__name__} computes something else in training than in evaluation at {where}, outside a "
            "module that reads self.training (nn.Dropout, timm's DropPath, torchvision's StochasticDepth): a traced "
            "graph keeps only one of the two paths, so QAT would train or deploy another network",
            "move that branch into a module that reads self.training in its forward (as timm's DropPath does), "
            "or set its rate to 0",
        )
    return evaluation.train(was)


def constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that hold no activation: parameters and buffers (``get_attr``), shape arithmetic (``x.shape[0] * 2``),
    and everything computed from those alone (a reshaped layer scale, an expanded class token)."""
    out: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            out.add(n)
        elif n.op == "call_method" and n.target in _SHAPE_METHODS:
            out.add(n)
        elif n.op == "call_function" and n.target in (getattr, operator.attrgetter) and n.args[1] in _SHAPE_ATTRIBUTES:
            out.add(n)
        elif n.op in ("call_function", "call_method") and all(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def parameter_names(gm: fx.GraphModule, n: fx.Node, constants: set[fx.Node]) -> list[str]:
    """The parameters and buffers a constant node is computed from (``stages.0.blocks.0.gamma``)."""
    seen, todo, names = set(), [n], []
    while todo:
        m = todo.pop()
        if m in seen or m not in constants:
            continue
        seen.add(m)
        if m.op == "get_attr":
            names.append(str(m.target))
        todo.extend(m.all_input_nodes)
    return sorted(names)
