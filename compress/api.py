"""The compression-recipe contract every method follows: a typed config, a registered handler, recorded results.

A *recipe* is a list of steps; a step names a registered method and its options::

    compress:
      - {method: lowrank, energy: 0.9}
      - {method: qat, freeze_observers_step: 200}

Each method is a ``XxxConfig`` dataclass (validated like every other config section: unknown options and bad
values are named with the fix before any work starts) plus a :class:`Method` handler registered for it with
:func:`register_method`. The training engine drives the handler through its lifecycle:

* :meth:`Method.prepare` — on the bare model, before ``accelerator.prepare``; it may use the
  :class:`CompressionContext` (an example input, the device, real training batches, the teacher);
* :meth:`Method.on_step` — after every optimizer update (e.g. freeze observers or batch norm at step N);
* :meth:`Method.convert` — before the final save and export, in place.

What a step produced that depends on data (pruned channel counts, factorisation ranks, which layers carry a
quantizer) is its *record*. A checkpoint stores every step as ``{"method", "config", "record"}`` so a fresh
process rebuilds the exact structure without data (:func:`rebuild`) and then loads the weights. A student loaded
from a checkpoint keeps its steps; new ones are appended, never replacing them.

Methods register themselves when :mod:`slimforge.compress` is imported, so loading a checkpoint never depends on
a user's import.

Example:
    >>> from slimforge.compress.api import method_names
    >>> "qat" in method_names()
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


class RecipeError(ValueError):
    """A recipe cannot be applied or rebuilt. ``problem`` says what is wrong, ``fix`` what to do."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  fix: {fix}" if fix else problem)


@dataclass
class MethodConfig:
    """Base of every method's options. Subclasses are dataclasses whose ``validate()`` returns problems."""

    def validate(self) -> list[str]:
        return []


@dataclass
class CompressionContext:
    """What a method may use while it prepares a model.

    Example:
        >>> images = torch.randn(64, 3, 32, 32)
        >>> ctx = CompressionContext(example_input=images[:1], batches=lambda n: iter(images[:n].split(16)))
        >>> sum(len(b) for b in ctx.batches(40))
        40
    """

    example_input: torch.Tensor
    """``[1, C, H, W]`` input of the model's size and normalisation."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the model will train."""
    batches: Callable[[int], Iterator[torch.Tensor]] | None = None
    """``n`` → an iterator over batches ``[B, C, H, W]`` of the first ``n`` real training images (fewer if the split
    is smaller), preprocessed with the evaluation transform: the same images on every rank. None without data."""
    teacher: nn.Module | None = None
    """The frozen teacher, when the run distils."""
    total_steps: int | None = None
    """The run's number of optimizer updates (what :meth:`Method.on_step` will count up to), for schedules that end
    with the run; None outside training (one-shot compression: a schedule then jumps to its end at once)."""


class Method:
    """Handler of one recipe step. One instance per step; it may keep state between the hooks.

    Args:
        config: The step's typed options.
        record: What an earlier run of this step recorded (when rebuilt from a checkpoint), else None.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig, record: dict[str, Any] | None = None) -> None:
        self.config = config
        self.record: dict[str, Any] = dict(record or {})

    def check_model(self, model: nn.Module) -> None:
        """Raises :class:`RecipeError` when the step cannot apply to ``model`` (checked before any work starts)."""

    def check_topology(
        self, distributed_type: str, zero_stage: int | None, weight_dtype: str = "float32"
    ) -> str | None:
        """Why this method cannot run under the launched topology (e.g. sharded parameters, or weights and buffers
        held in ``weight_dtype`` by DeepSpeed's mixed precision), or None."""
        return None

    def prepare(self, model: nn.Module, ctx: CompressionContext) -> nn.Module:
        """Transforms the bare model for training; returns it (a method may return a new root module)."""
        raise NotImplementedError

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called with the bare model after optimizer update ``step`` (1-based); must be idempotent for a step."""

    def convert(self, model: nn.Module) -> None:
        """Turns the trained model into its final form, in place, before it is saved and exported."""

    def rebuild(self, model: nn.Module) -> nn.Module:
        """Recreates, without data, the structure :meth:`prepare` + :meth:`convert` left, from ``self.record``."""
        raise NotImplementedError

    def step_record(self) -> dict[str, Any]:
        """The step as a checkpoint stores it: ``{"method", "config", "record"}``."""
        return {"method": self.name, "config": dataclasses.asdict(self.config), "record": dict(self.record)}


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str, config_class: type[MethodConfig]) -> Callable[[type[Method]], type[Method]]:
    """Registers a :class:`Method` subclass as recipe method ``name`` with options ``config_class``."""

    def decorator(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"compression method {name!r} is registered twice")
        cls.name = name
        cls.config_class = config_class
        _METHODS[name] = cls
        return cls

    return decorator


def method_names() -> list[str]:
    """Names of the registered compression methods."""
    return sorted(_METHODS)


def method_class(name: Any) -> type[Method]:
    """The handler registered as ``name``.

    Raises:
        RecipeError: no method has that name.
    """
    if name not in _METHODS:
        raise RecipeError(
            f"unknown compression method {name!r}", f"use one of: {', '.join(method_names()) or 'none registered'}"
        )
    return _METHODS[name]


def is_quantized(recipe: list[dict[str, Any]]) -> bool:
    """Whether a checkpoint's recipe holds a step that leaves the model quantised (fake-quant for int8)."""
    return any(getattr(method_class(s.get("method")), "quantizes", False) for s in recipe)


def rebuild(model: nn.Module, recipe: list[dict[str, Any]], from_config: Callable[[type, dict], Any]) -> nn.Module:
    """Replays a checkpoint's recipe on a freshly built architecture, without data, before its weights load.

    Args:
        model: The bare architecture the checkpoint's spec describes.
        recipe: The checkpoint's steps, ``[{"method", "config", "record"}, ...]``.
        from_config: ``(config_class, options) -> config``: the typed-config builder (slimforge.train.config).

    Returns:
        The model with every step's structure (it may be a new root module).

    Raises:
        RecipeError: a step names an unknown method or its recorded structure does not fit the model.
    """
    for i, step in enumerate(recipe):
        if not isinstance(step, dict) or "config" not in step:
            raise RecipeError(f"recipe step {i} is not a recorded step ({step!r})", "re-create the checkpoint")
        cls = method_class(step.get("method"))
        handler = cls(from_config(cls.config_class, dict(step["config"])), step.get("record"))
        model = handler.rebuild(model)
    return model
