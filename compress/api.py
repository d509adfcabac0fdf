"""Compression recipes: a registry of named in-place transforms of a bare ``nn.Module``.

A recipe is a list of steps ``{"method": <registered name>, **options}``. Each method is registered with
:func:`register_method` and mutates the model in place (``verb_`` style, as torchao's ``quantize_``). Training
applies the recipe to the bare model *before* ``accelerator.prepare``; checkpoints store the recipe so a loader
rebuilds the same structure (e.g. pruned channels, factorised layers) before loading the weights.

Example:
    >>> import torch
    >>> from slimforge.compress.api import register_method, apply_recipe_
    >>> @register_method("zero_bias")
    ... def _zero_bias(model, options):
    ...     for m in model.modules():
    ...         if getattr(m, "bias", None) is not None:
    ...             torch.nn.init.zeros_(m.bias)
    >>> _ = apply_recipe_(torch.nn.Linear(2, 2), [{"method": "zero_bias"}])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

Handler = Callable[[nn.Module, dict[str, Any]], None]
_METHODS: dict[str, Handler] = {}


class RecipeError(ValueError):
    """A recipe step names an unknown method or has invalid options."""


def register_method(name: str) -> Callable[[Handler], Handler]:
    """Registers ``fn(model, options)`` as compression method ``name``."""

    def decorator(fn: Handler) -> Handler:
        if name in _METHODS:
            raise RecipeError(f"compression method {name!r} is registered twice")
        _METHODS[name] = fn
        return fn

    return decorator


def available_methods() -> list[str]:
    """Names of the registered compression methods."""
    return sorted(_METHODS)


def check_recipe(recipe: list[dict[str, Any]]) -> list[str]:
    """Problems with ``recipe`` (unknown methods, malformed steps); empty when it can be applied."""
    problems = []
    for i, step in enumerate(recipe):
        method = step.get("method") if isinstance(step, dict) else None
        if method not in _METHODS:
            known = ", ".join(available_methods()) or "none registered yet"
            problems.append(f"step {i}: unknown compression method {method!r} (available: {known})")
    return problems


def apply_recipe_(model: nn.Module, recipe: list[dict[str, Any]]) -> nn.Module:
    """Applies every step of ``recipe`` to ``model`` in place, in order, and returns it."""
    problems = check_recipe(recipe)
    if problems:
        raise RecipeError("; ".join(problems))
    for step in recipe:
        options = {k: v for k, v in step.items() if k != "method"}
        _METHODS[step["method"]](model, options)
    return model
