"""The ``compress`` section of a run config: typed recipe steps, validated and turned into method handlers.

Each step is ``{method: <registered name>, <option>: <value>, ...}``; its options are checked against the method's
``XxxConfig`` dataclass exactly as every other section is (unknown options, wrong types and impossible values are
named, with the fix, before any work starts).

Example:
    >>> from slimforge.train.recipe import build_methods
    >>> [m.name for m in build_methods([{"method": "qat", "freeze_bn_step": 10}])]
    ['qat']
"""

from __future__ import annotations

from typing import Any

import slimforge.compress  # noqa: F401  registers every built-in method
from slimforge.compress.api import Method, MethodConfig, RecipeError, method_class, method_names
from slimforge.train.config import build_section, from_dict
from slimforge.train.errors import ConfigError


def step_problems(steps: list[dict[str, Any]]) -> list[str]:
    """Every problem of every step, each prefixed with its index (``[0].activations: ...``)."""
    problems: list[str] = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            problems.append(f"[{i}]: expected a mapping {{method: ..., options}}, got {step!r}")
            continue
        name = step.get("method")
        try:
            cls = method_class(name)
        except RecipeError:
            problems.append(
                f"[{i}].method: unknown compression method {name!r} (available: {', '.join(method_names())})"
            )
            continue
        options = {k: v for k, v in step.items() if k != "method"}
        _, errors = build_section(cls.config_class, options, f"[{i}]")
        problems += errors
    return problems


def build_methods(steps: list[dict[str, Any]]) -> list[Method]:
    """One handler per step, in order.

    Raises:
        ConfigError: a step names an unknown method or has invalid options.
    """
    problems = step_problems(steps)
    if problems:
        raise ConfigError([f"compress{p}" for p in problems], fix="fix the compress steps of the run config")
    methods = []
    for step in steps:
        cls = method_class(step["method"])
        config, _ = build_section(cls.config_class, {k: v for k, v in step.items() if k != "method"}, "")
        methods.append(cls(config))
    return methods


def recorded_config(cls: type[MethodConfig], options: dict[str, Any]) -> MethodConfig:
    """The typed config of a step a checkpoint recorded (for :func:`slimforge.compress.api.rebuild`)."""
    return from_dict(cls, options)
