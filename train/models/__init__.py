"""Model factory: any timm model, any torchvision classifier, or a user factory ``package.module:function``.

A model is described by a :class:`ModelSpec` (source, name, kwargs, classes, input size, normalisation and the
compression recipe applied to it); checkpoints store that spec so a model is rebuilt without pickled code.
Model code knows nothing about compression or distribution.

Example:
    >>> from slimforge.train.models import ModelConfig, build_model
    >>> model, spec = build_model(ModelConfig(name="resnet10t"), num_classes=10, input_size=(1, 32, 32))
    >>> spec.num_classes
    10
"""

from __future__ import annotations

import difflib
import importlib
import logging
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn

from slimforge.train.errors import ModelError, first_line

logger = logging.getLogger(__name__)

SOURCES = ("timm", "torchvision", "factory")


@dataclass
class ModelConfig:
    """Which architecture to build and how to initialise it."""

    source: Literal["timm", "torchvision", "factory"] = "timm"
    """timm: ``timm.create_model``; torchvision: ``torchvision.models.get_model``; factory: ``name`` is
    ``package.module:function`` called as ``function(num_classes=..., in_chans=..., **kwargs)``."""
    name: str | None = None
    """Architecture name (e.g. ``resnet18``). May be omitted when ``checkpoint`` is set (the checkpoint says)."""
    num_classes: int | None = None
    """Output classes; ``None`` takes the dataset's. A different value from the dataset's is an error."""
    pretrained: bool = False
    """Load the library's hub weights (needs internet; the classifier is re-initialised for num_classes)."""
    checkpoint: str | None = None
    """A slimforge checkpoint directory to load architecture and weights from (e.g. a trained teacher)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the factory, e.g. ``{drop_rate: 0.1}`` or ``{img_size: 32, patch_size: 4}``."""
    allow_factory: bool = False
    """Let ``checkpoint`` load a model whose recorded architecture is a user factory (``source: factory``):
    rebuilding it imports and runs the Python function the checkpoint names, so it is refused unless set. A model
    built from ``source: factory`` and ``name`` in this config runs the function the config itself names."""

    def validate(self) -> list[str]:
        p = []
        if self.name is None and self.checkpoint is None:
            p.append("name: set a model name (e.g. resnet18) or a checkpoint to load it from")
        if self.source == "factory" and self.name is not None and ":" not in self.name:
            p.append(f"name: factory models are named 'package.module:function', got {self.name!r}")
        if self.num_classes is not None and self.num_classes < 1:
            p.append(f"num_classes: {self.num_classes} must be >= 1")
        if self.pretrained and self.checkpoint is not None:
            p.append("pretrained: set either pretrained or checkpoint, not both")
        for reserved in ("num_classes", "in_chans", "pretrained"):
            if reserved in self.kwargs:
                p.append(f"kwargs.{reserved}: set it as model.{reserved} / data.in_chans, not in kwargs")
        return p


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model's architecture and feed it (stored in every checkpoint)."""

    source: str
    name: str
    num_classes: int
    input_size: list[int]
    """``[C, H, W]`` the model was trained on."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    interpolation: str = "bilinear"
    class_names: list[str] = field(default_factory=list)
    recipe: list[dict[str, Any]] = field(default_factory=list)
    """Compression steps applied to the bare model, in order, each ``{"method", "config", "record"}``: the record
    holds what the step decided from data (layers, ranks, channel counts), so the structure is rebuilt without
    data before the weights load."""

    @property
    def in_chans(self) -> int:
        return self.input_size[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """The spec a model description (a checkpoint's ``slimforge.json`` ``model``) holds.

        Raises:
            ModelError: a field is unknown, missing or of the wrong kind, or the source is not one slimforge builds.
        """
        fix = "it was written by another slimforge version or edited by hand: re-create it with this version"
        if not isinstance(d, dict):
            raise ModelError(f"the model description is {type(d).__name__}, not a mapping", fix)
        known = [f.name for f in fields(cls)]
        problems = [f"unknown field {k!r}" for k in d if k not in known]
        problems += [
            f"missing field {f.name!r}"
            for f in fields(cls)
            if f.name not in d and f.default is MISSING and f.default_factory is MISSING
        ]
        if "source" in d and d["source"] not in SOURCES:
            problems.append(f"unknown model source {d['source']!r} (slimforge builds {', '.join(SOURCES)})")
        if "name" in d and not isinstance(d["name"], str):
            problems.append(f"name {d['name']!r} is not a string")
        if "num_classes" in d and not (isinstance(d["num_classes"], int) and d["num_classes"] >= 1):
            problems.append(f"num_classes {d['num_classes']!r} is not a positive integer")
        size = d.get("input_size", [1, 1, 1])
        if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
            problems.append(f"input_size {size!r} is not [C, H, W]")
        if problems:
            raise ModelError(f"the model description has {'; '.join(problems)}", fix + f" (known fields: {known})")
        return cls(**d)


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    return (
        f"close names: {', '.join(close)}" if close else "list the available names with timm.list_models('*pattern*')"
    )


def _create_timm(name: str, num_classes: int, in_chans: int, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ModelError(f"timm has no model named {name!r}", _suggest(name, timm.list_models()))
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)


def _create_torchvision(name: str, num_classes: int, in_chans: int, pretrained: bool, kwargs: dict) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if name not in known:
        raise ModelError(f"torchvision has no classification model named {name!r}", _suggest(name, known))
    if in_chans != 3:
        raise ModelError(
            f"torchvision's {name} takes 3-channel images, but data.in_chans is {in_chans}",
            "set data.in_chans=3 (grayscale images are replicated to RGB) or use a timm model",
        )
    if pretrained:
        if num_classes != 1000:
            raise ModelError(
                f"pretrained torchvision {name} has a 1000-class ImageNet head, the dataset has {num_classes}",
                "use source: timm with pretrained: true (timm re-initialises the classifier for num_classes)",
            )
        return torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def _create_factory(name: str, num_classes: int, in_chans: int, pretrained: bool, kwargs: dict) -> nn.Module:
    module_name, _, fn_name = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ModelError(
            f"cannot import model factory {name!r}: {e}", "make the module importable and the function exist"
        ) from None
    model = fn(num_classes=num_classes, in_chans=in_chans, **kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {name!r} returned {type(model).__name__}, not an nn.Module", "return a module")
    return model


_SOURCES = {"timm": _create_timm, "torchvision": _create_torchvision, "factory": _create_factory}

FACTORY_OPT_IN = (
    "load it with allow_factory (train/distill.py: model.allow_factory=true or teacher.allow_factory=true; "
    "export/export.py and export/benchmark.py: --allow-factory)"
)


def check_factory(spec: ModelSpec, allowed: bool, where: str, opt_in: str = FACTORY_OPT_IN) -> None:
    """Refuses to rebuild a model described as a user factory unless the user opted in: a checkpoint or an artifact
    is data, and rebuilding a factory model imports and calls the Python function its description names.

    Args:
        spec: The description read from the checkpoint or artifact.
        allowed: The user's opt-in (``allow_factory`` / ``--allow-factory``).
        where: What holds the description, for the message (e.g. ``"teacher checkpoint runs/t/checkpoint"``).
        opt_in: How this caller's user opts in, for the fix.

    Raises:
        ModelError: ``spec`` names a factory and ``allowed`` is false.
    """
    if spec.source == "factory" and not allowed:
        raise ModelError(
            f"{where} was built by the user factory {spec.name!r}: rebuilding it imports and runs that Python code, "
            "which slimforge does only when asked to",
            f"if you trust that code, {opt_in}",
        )


def _show(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def check_class_names(found: list[str], expected: list[str], subject: str, labels: tuple[str, str], fix: str) -> None:
    """Refuses class names that differ from the expected ones, or the same names in another order: a logit index
    means the class at that position, so two lists that differ anywhere make every comparison between them wrong.
    An empty list (a model description that records no names) is not compared.

    Args:
        found: The names ``subject`` carries (a checkpoint's or an artifact's description).
        expected: The names it is compared with (the data's, or the teacher's).
        subject: What carries ``found``, e.g. ``"teacher checkpoint runs/t/checkpoint"``.
        labels: Short names of the two sides, e.g. ``("teacher", "dataset")``.
        fix: What the user should do.

    Raises:
        ModelError: naming the first position that differs and both lists.
    """
    found, expected = list(found), list(expected)
    if not found or not expected or found == expected:
        return
    a, b = labels
    if len(found) != len(expected):
        where = f"{len(found)} classes in the {a}, {len(expected)} in the {b}"
    else:
        i = next(i for i, (x, y) in enumerate(zip(found, expected)) if x != y)
        same = " (the same names in another order)" if sorted(found) == sorted(expected) else ""
        where = f"position {i} is {found[i]!r} in the {a}, {expected[i]!r} in the {b}{same}"
    lists = f"\n  {a}: {_show(found)}\n  {b}: {_show(expected)}"
    raise ModelError(f"{subject} names its classes differently from the {b}: {where}{lists}", fix)


def create_model(spec: ModelSpec, pretrained: bool = False) -> nn.Module:
    """Builds the bare architecture ``spec`` describes (weights random unless ``pretrained``)."""
    if spec.source not in _SOURCES:
        raise ModelError(f"unknown model source {spec.source!r}", f"use one of {', '.join(_SOURCES)}")
    try:
        return _SOURCES[spec.source](spec.name, spec.num_classes, spec.in_chans, pretrained, dict(spec.kwargs))
    except ModelError:
        raise
    except TypeError as e:  # unknown kwargs end up here
        raise ModelError(f"cannot build {spec.source} model {spec.name!r}: {e}", "check model.kwargs") from None


def check_input(model: nn.Module, spec: ModelSpec) -> None:
    """Runs one ``[1, C, H, W]`` forward to prove the model takes the configured input and gives the classes.

    Raises:
        ModelError: the model rejects the input size or returns the wrong shape.
    """
    c, h, w = spec.input_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, c, h, w))
    except Exception as e:  # models raise assertion/runtime/value errors for sizes they cannot take
        hint = ""
        default = getattr(model, "pretrained_cfg", {}).get("input_size")
        if default:
            hint = f" (its default input is {list(default)})"
        raise ModelError(
            f"model {spec.name!r} cannot take input {[c, h, w]}{hint}: {first_line(e)}",
            "set data.image_size to a size the model takes, or pass a matching size in model.kwargs "
            "(timm ViTs: kwargs: {img_size: <size>})",
        ) from None
    finally:
        model.train(was_training)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if tuple(out.shape) != (1, spec.num_classes):
        raise ModelError(
            f"model {spec.name!r} returns shape {list(out.shape)} for one image, expected [1, {spec.num_classes}]",
            "make the model return logits [B, num_classes]",
        )


def resolve_num_classes(cfg: ModelConfig, dataset_classes: int, role: str) -> int:
    """The model's class count: the dataset's, checked against an explicit ``num_classes``."""
    if cfg.num_classes is not None and cfg.num_classes != dataset_classes:
        raise ModelError(
            f"{role}.num_classes is {cfg.num_classes} but the dataset has {dataset_classes} classes",
            f"remove {role}.num_classes (it defaults to the dataset's) or use a dataset with that many classes",
        )
    return dataset_classes


def build_model(
    cfg: ModelConfig,
    num_classes: int,
    input_size: tuple[int, int, int] | list[int],
    data_info: dict[str, Any] | None = None,
    class_names: list[str] | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Builds the bare model ``cfg`` names and checks it takes ``input_size`` ``[C, H, W]``.

    Args:
        cfg: The model section of the config (``name`` required; checkpoints go through ``train.checkpoint``).
        num_classes: Output classes.
        input_size: ``[C, H, W]`` of the images it will be fed.
        data_info: Normalisation facts (``mean``, ``std``, ``interpolation``) recorded in the spec.
        class_names: Names of the classes, recorded in the spec.

    Returns:
        The model in train mode and its spec.
    """
    info = data_info or {}
    spec = ModelSpec(
        source=cfg.source,
        name=str(cfg.name),
        num_classes=num_classes,
        input_size=list(input_size),
        kwargs=dict(cfg.kwargs),
        mean=list(info.get("mean", [])),
        std=list(info.get("std", [])),
        interpolation=info.get("interpolation", "bilinear"),
        class_names=list(class_names or []),
    )
    model = create_model(spec, pretrained=cfg.pretrained)
    check_input(model, spec)
    return model, spec
