"""Typed configs: dataclass schema + YAML values + ``section.key=value`` overrides.

Every component owns a ``XxxConfig`` dataclass whose ``validate()`` returns the problems it finds. This module
turns plain YAML data into those dataclasses, collecting *every* unknown key, wrong type and impossible value
before raising one :class:`slimforge.train.errors.ConfigError`, so a user fixes a config in one go.

Example:
    >>> from slimforge.train.config import load_config
    >>> from slimforge.train.schema import RunConfig
    >>> cfg = load_config(RunConfig, "configs/debug/tiny_train.yaml", ["optim.lr=0.01"])
    >>> cfg.optim.lr
    0.01
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from slimforge.train.errors import ConfigError, SlimforgeError

T = TypeVar("T")

_MISSING = object()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Checks ``value`` against annotation ``tp``; returns the converted value or ``_MISSING`` on error."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping of {tp.__name__} fields, got {type(value).__name__} {value!r}")
            return _MISSING
        return _build(tp, value, where, errors)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
        else:
            for arg in args:
                if arg is type(None):
                    continue
                trial: list[str] = []
                out = _convert(value, arg, where, trial)
                if not trial:
                    return out
            non_none = [a for a in args if a is not type(None)]
            if len(non_none) == 1:  # Optional[X]: report X's own, more precise, error.
                return _convert(value, non_none[0], where, errors)
        errors.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return _MISSING
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        if isinstance(value, bool) and ("no" if value is False else "yes") in allowed:
            return "no" if value is False else "yes"  # YAML 1.1 reads a bare no/yes (off/on) as a boolean
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        errors.append(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}{hint}")
        return _MISSING
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            errors.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return _MISSING
        (item_tp, *rest) = typing.get_args(tp) or (Any,)
        if origin is tuple and rest and rest[0] is not Ellipsis:
            errors.append(f"{where}: fixed-length tuples are not supported in configs")
            return _MISSING
        n_err = len(errors)
        items = [_convert(v, item_tp, f"{where}[{i}]", errors) for i, v in enumerate(value)]
        if len(errors) > n_err:
            return _MISSING
        return list(items) if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
            return _MISSING
        key_tp, val_tp = typing.get_args(tp) or (str, Any)
        return {k: _convert(v, val_tp, f"{where}.{k}", errors) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-3` (no dot) as a string; accept numeric strings for float fields only.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config type {tp!r} at {where} is not supported")
    errors.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return _MISSING


def _build(cls: type[T], data: dict[str, Any], where: str, errors: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    prefix = f"{where}." if where else ""
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            errors.append(f"{prefix}{key}: unknown key{hint}")
            continue
        out = _convert(value, hints[key], f"{prefix}{key}", errors)
        if out is not _MISSING:
            kwargs[key] = out
    for name, f in fields.items():
        if name in kwargs or name in data:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix}{name}: required key is missing")
    n_err = len(errors)
    try:
        obj = cls(**kwargs)
    except TypeError:
        # Only reachable when fields above failed to convert; those errors are already recorded.
        if len(errors) == n_err:
            raise
        return _MISSING  # type: ignore[return-value]
    validate = getattr(obj, "validate", None)
    if validate is not None:
        errors.extend(f"{prefix}{p}" for p in validate())
    return obj


def at_least(cfg: Any, minimum: float, *names: str) -> list[str]:
    """Problems for each field in ``names`` of ``cfg`` below ``minimum`` (a ``None`` value is allowed: "or null").

    Example:
        >>> from types import SimpleNamespace
        >>> at_least(SimpleNamespace(epochs=0, max_steps=None), 1, "epochs", "max_steps")
        ['epochs: 0 must be >= 1']
    """
    problems = []
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            problems.append(f"{name}: {value} must be >= {minimum:g}")
    return problems


def build_section(cls: type[T], data: dict[str, Any], where: str) -> tuple[T | None, list[str]]:
    """Builds ``cls`` from ``data`` and returns it with every problem found (prefixed with ``where``)."""
    errors: list[str] = []
    obj = _build(cls, data, where, errors)
    return (None if errors else obj), errors


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Builds config dataclass ``cls`` from plain data, raising one ConfigError listing every problem."""
    errors: list[str] = []
    obj = _build(cls, data, "", errors)
    if errors:
        raise ConfigError(
            errors, fix="edit the YAML or the section.key=value overrides (every key: README.md, 'Config reference')"
        )
    return obj


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line saying why ``yaml.safe_load`` refused a text: a tag it does not construct, or the syntax error."""
    if isinstance(e, yaml.constructor.ConstructorError) and e.problem and "tag" in e.problem:
        tag = e.problem.split("tag", 1)[1].strip(" '").replace("tag:yaml.org,2002:", "!!")
        return f"tag {tag} is not allowed: values are plain YAML, never Python objects"
    mark = getattr(e, "problem_mark", None)
    where = f" at character {mark.column + 1} of the value" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}".replace("\n", " ")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``a.b.c=value`` overrides to nested ``data`` in place; values are parsed with ``yaml.safe_load``
    (plain YAML: no tags, no code).

    Raises:
        ConfigError: an override is not ``section.key=value``, or its value is not plain YAML.
    """
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected section.key=value")
            continue
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"override {item!r}: {part!r} is not a section")
                break
            node = child
        else:
            try:
                node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as e:
                problems.append(f"override {item!r}: the value is not plain YAML ({_yaml_problem(e)})")
    if problems:
        raise ConfigError(
            problems,
            fix="write overrides as section.key=<plain YAML value>, e.g. optim.lr=0.01 or compress=[{method: qat}] "
            "(quote a text YAML would read otherwise: key='a: b')",
        )
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a YAML mapping with ``yaml.safe_load`` (no tags, no code)."""
    path = Path(path)
    if not path.is_file():
        raise SlimforgeError(f"config file {path} does not exist", "pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SlimforgeError(f"config file {path} is not valid YAML: {e}", "fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SlimforgeError(f"config file {path} must hold a mapping, got {type(data).__name__}", "see configs/")
    return data


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: list[str] | None = None) -> T:
    """Loads ``cls`` from a YAML file plus ``section.key=value`` overrides, validated before any work."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (what is written next to a run's outputs)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
