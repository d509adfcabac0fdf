"""Self-describing checkpoints: ``model.safetensors`` + ``slimforge.json`` in one directory.

The JSON holds the :class:`slimforge.train.models.ModelSpec` (architecture, classes, input size, normalisation,
compression recipe) and the SHA-256 of the weights file, so a student is rebuilt and exported without the
training config or any pickled code. A checkpoint directory is written under a temporary name and renamed
into place only once complete: a crash mid-write leaves a ``.tmp`` folder, never something that looks whole.

Example:
    >>> from slimforge.train.checkpoint import load_checkpoint
    >>> model, spec, meta = load_checkpoint("runs/teacher/checkpoint")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimforge.train.errors import CheckpointError, ModelError
from slimforge.train.models import FACTORY_OPT_IN, ModelSpec, check_factory, create_model

logger = logging.getLogger(__name__)

FORMAT = "slimforge.checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
META = "slimforge.json"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions(*dists: str) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    state_dict: dict[str, torch.Tensor], spec: ModelSpec, path: str | os.PathLike, extra: dict[str, Any] | None = None
) -> Path:
    """Writes a checkpoint directory atomically and returns its path.

    Args:
        state_dict: The bare model's weights (not a DDP/DeepSpeed wrapper's).
        spec: The architecture the weights belong to.
        path: Target directory; an existing checkpoint there is replaced only after the new one is complete.
        extra: JSON-serialisable facts to record (metrics, config, provenance).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # safetensors refuses shared or non-contiguous tensors; clone makes each one its own contiguous buffer.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": spec.to_dict(),
        "weights": {"file": WEIGHTS, "sha256": file_sha256(tmp / WEIGHTS), "bytes": (tmp / WEIGHTS).stat().st_size},
        # The libraries that build the architecture: a recipe's recorded structure is rebuilt by them.
        "versions": _versions("slimforge", "torch", "torchvision", "timm"),
        "extra": extra or {},
    }
    with open(tmp / META, "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old)
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks a checkpoint's metadata (not the weights).

    Raises:
        CheckpointError: the directory, the JSON or the weights file is missing, malformed or incomplete.
    """
    path = Path(path)
    fix = "point to a complete slimforge checkpoint directory (re-run the training that writes it)"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a directory", fix)
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {META}: it is incomplete or not a slimforge checkpoint", fix)
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {META} is corrupted ({e})", fix) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: {META} is not a slimforge checkpoint description", fix)
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {meta.get('version')}, this slimforge reads {VERSION}",
            "use the slimforge version that wrote it",
        )
    spec_from_meta(meta, f"checkpoint {path}: {META}")
    record = meta.get("weights")
    if not (isinstance(record, dict) and {"file", "bytes", "sha256"} <= set(record)):
        raise CheckpointError(f"checkpoint {path}: {META} has no complete 'weights' record (file, bytes, sha256)", fix)
    if record["file"] != WEIGHTS:  # a name like ../other.bin would read a file outside the checkpoint
        raise CheckpointError(f"checkpoint {path}: {META} names weights file {record['file']!r}, not {WEIGHTS}", fix)
    weights = path / meta["weights"]["file"]
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {path} is missing its weights file {weights.name}", fix)
    size = weights.stat().st_size
    if size != meta["weights"]["bytes"]:
        raise CheckpointError(
            f"checkpoint {path}: {weights.name} has {size} bytes, expected {meta['weights']['bytes']} (truncated?)",
            fix,
        )
    if file_sha256(weights) != meta["weights"]["sha256"]:
        raise CheckpointError(f"checkpoint {path}: {weights.name} does not match its SHA-256 (corrupted)", fix)
    return meta


def spec_from_meta(meta: dict[str, Any], where: str) -> ModelSpec:
    """The :class:`ModelSpec` of a model description (a checkpoint's metadata or an artifact's embedded copy).

    Raises:
        CheckpointError: the description has unknown or missing fields, or a model source slimforge does not build.
    """
    try:
        return ModelSpec.from_dict(meta.get("model"))
    except ModelError as e:
        raise CheckpointError(f"{where}: {e.problem}", e.fix) from None


def read_spec(path: str | os.PathLike) -> ModelSpec:
    """The :class:`ModelSpec` a checkpoint holds."""
    return spec_from_meta(read_meta(path), f"checkpoint {path}")


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors of ``state`` that hold a nan or an inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def rebuild_model(
    spec: ModelSpec, where: str = "", allow_factory: bool = False, opt_in: str = FACTORY_OPT_IN
) -> nn.Module:
    """The bare architecture ``spec`` describes with its compression recipe replayed (no data, random weights).

    Args:
        spec: A description read from a checkpoint or an artifact.
        where: What holds it, for messages.
        allow_factory: Rebuild a user-factory model (imports and calls the function ``spec`` names).
        opt_in: How the caller's user sets ``allow_factory``, for the refusal's fix.

    Raises:
        CheckpointError: ``spec`` names a user factory and ``allow_factory`` is false, or a recipe step cannot be
            rebuilt (unknown method, structure that no longer fits).
    """
    from slimforge.compress.api import RecipeError, rebuild
    from slimforge.train.errors import ConfigError
    from slimforge.train.recipe import recorded_config

    try:
        check_factory(spec, allow_factory, where or f"model {spec.name!r}", opt_in)
    except ModelError as e:
        raise CheckpointError(e.problem, e.fix) from None
    model = create_model(spec)
    try:
        return rebuild(model, spec.recipe, recorded_config)
    except (RecipeError, ConfigError) as e:
        raise CheckpointError(
            f"{where or spec.name}: cannot rebuild its compressed structure: {getattr(e, 'problem', e)}",
            getattr(e, "fix", "") or "re-create the checkpoint with this slimforge version",
        ) from None


def load_checkpoint(
    path: str | os.PathLike, map_location: str = "cpu", allow_factory: bool = False, opt_in: str = FACTORY_OPT_IN
) -> tuple[nn.Module, ModelSpec, dict]:
    """Rebuilds the model a checkpoint describes and loads its weights (strictly).

    Args:
        path: The checkpoint directory.
        map_location: Device the weights are read to.
        allow_factory: Load a checkpoint whose architecture is a user factory (``source: factory``): rebuilding it
            imports and calls the Python function its metadata names, so it is refused unless the user opted in.
        opt_in: How the caller's user opts in, for the refusal's fix.

    Returns:
        ``(model, spec, meta)``; the model is in eval mode.

    Raises:
        CheckpointError: the checkpoint is missing, truncated, corrupted, does not fit its architecture, holds
            non-finite values, or names a user factory without ``allow_factory``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    spec = spec_from_meta(meta, f"checkpoint {path}")
    model = rebuild_model(spec, f"checkpoint {path}", allow_factory, opt_in)
    try:
        state = load_file(str(path / meta["weights"]["file"]), device=map_location)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read weights: {e}", "re-create the checkpoint") from None
    fix = "the JSON and the weights come from different models; re-create the checkpoint"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit {spec.source} {spec.name}: {detail}", fix
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit {spec.source} {spec.name} "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})",
            fix,
        )
    bad = non_finite(state)
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds non-finite values (nan/inf) in {', '.join(bad[:3])}: the training that wrote "
            "it diverged, and nothing computed from it would mean anything",
            "retrain (lower optim.lr, set optim.grad_clip) or use an earlier checkpoint",
        )
    return model.eval(), spec, meta
