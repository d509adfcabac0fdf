"""Resumable training state: Accelerate's ``save_state`` folders, written atomically, found newest-first.

A state folder ``output_dir/state/step_00000120/`` holds what ``accelerator.save_state`` writes (model,
optimizer — sharded under DeepSpeed and FSDP — and every rank's RNG states) plus ``slimforge_state.json`` with the
loop position and the run's fingerprint. It is written under a temporary name and renamed once every rank has
finished, so the newest folder with that JSON is always complete. Nothing here is unpickled with
``weights_only=False``: Accelerate loads these files with ``weights_only=True``.

Which state to resume is decided by rank 0 and broadcast (``slimforge.train.engine.outputs.newest_state``). A state
is resumed only by a run with the same fingerprint: everything that changes the numerics or the schedule.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from slimforge.train.errors import SlimforgeError

logger = logging.getLogger(__name__)

STATE_META = "slimforge_state.json"
PREFIX = "step_"

FREE_FIELDS = frozenset(
    {
        "train.output_dir", "train.log_every", "train.overwrite", "train.tensorboard", "train.record_samples",
        "train.checkpoint_every", "train.keep_states", "train.resume", "train.max_steps", "train.cpu_threads",
        "train.collective_timeout_s", "data.num_workers", "data.eval_batch_size", "data.max_val_samples",
        "data.pin_memory", "data.persistent_workers", "data.prefetch_factor", "model.allow_factory",
        "teacher.allow_factory", "cache.path", "cache.batch_size",
    }
)  # fmt: skip
"""Run-config fields a resumed run may change: they change neither the numerics nor the schedule (``max_steps``
only where the run stops; the LR schedule spans ``epochs``)."""


def fingerprint(cfg, accelerator) -> dict[str, Any]:
    """Everything a resumed run must share with the run that saved the state: every run-config field except
    :data:`FREE_FIELDS` (batch, LR and schedule, epochs, recipe, data, seed, models, losses, precision ...), plus
    the launch's world size and strategy. Flat ``{"section.key": value}``."""
    from slimforge.train.config import to_dict

    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = node

    walk("", to_dict(cfg))
    kept = {k: v for k, v in flat.items() if k not in FREE_FIELDS}
    kept["launch.world_size"] = accelerator.num_processes
    kept["launch.distributed_type"] = str(accelerator.distributed_type)
    return json.loads(json.dumps(kept))  # as stored: tuples become lists


def changed_fields(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"optim.lr: 0.01 -> 0.02"`` for every field whose value differs between two fingerprints."""
    unset = "<unset>"
    return [
        f"{k}: {saved.get(k, unset)!r} -> {now.get(k, unset)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k, unset) != now.get(k, unset)
    ]


def state_dirs(root: Path) -> list[Path]:
    """Complete state folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_META).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def save_train_state(accelerator, root: Path, position: dict[str, Any], keep: int, fingerprint: dict[str, Any]) -> Path:
    """Saves the full training state of every rank with the run's ``fingerprint``; a collective (all ranks call
    it)."""
    final = root / f"{PREFIX}{position['step']:08d}"
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its RNG state; DeepSpeed ranks write their shards
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = dict(
            position,
            world_size=accelerator.num_processes,
            distributed_type=str(accelerator.distributed_type),
            fingerprint=fingerprint,
        )
        with open(tmp / STATE_META, "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in state_dirs(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def check_state(path: Path, accelerator, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The loop position stored in ``path``; raises if it was saved by a different run, or if any rank's RNG or
    the optimizer state is missing."""
    meta = json.loads((path / STATE_META).read_text())
    fix = f"delete {path} to resume from an older state, or start a new run in another train.output_dir"
    afresh = "or start afresh with train.resume=false (or train.overwrite=true), which deletes the old states"
    if meta["world_size"] != accelerator.num_processes:
        raise SlimforgeError(
            f"{path} was saved by {meta['world_size']} processes, this run has {accelerator.num_processes}: "
            "per-rank RNG and data positions cannot be mapped",
            f"relaunch with {meta['world_size']} processes, {afresh}",
        )
    if "fingerprint" not in meta:
        raise SlimforgeError(
            f"{path} records no run fingerprint (an older slimforge wrote it): it cannot be told apart from the state "
            "of another run",
            f"resume it with the slimforge that wrote it, {afresh}",
        )
    changes = changed_fields(meta["fingerprint"], fingerprint)
    if changes:
        raise SlimforgeError(
            f"{path} is the state of a different run: since it was saved, {'; '.join(changes)}. Resuming would "
            "continue that run with other numerics",
            f"relaunch with the settings it was saved with to resume it, {afresh}",
        )
    missing = [
        f"random_states_{r}.pkl" for r in range(meta["world_size"]) if not (path / f"random_states_{r}.pkl").exists()
    ]
    has_optimizer = (
        (path / "optimizer.bin").exists()  # DDP / one process / FSDP full state dict
        or any(path.glob("pytorch_model*/*optim_states.pt"))  # DeepSpeed's ZeRO shards
        or any(p.is_dir() and any(p.iterdir()) for p in path.glob("optimizer_*"))  # FSDP's sharded layout
    )
    if not has_optimizer:
        missing.append("optimizer state")
    if missing:
        raise SlimforgeError(f"training state {path} is missing {', '.join(missing)}", fix)
    return meta


def clear_states(accelerator, root: Path) -> None:
    """Deletes every state under ``root`` (a fresh start); a collective."""
    if accelerator.is_main_process and root.exists():
        logger.info("starting afresh: deleting the %d resumable states in %s", len(state_dirs(root)), root)
        shutil.rmtree(root)
    accelerator.wait_for_everyone()


def load_train_state(accelerator, path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Restores the state in ``path`` (every rank the same one: see
    :func:`slimforge.train.engine.outputs.newest_state`); returns its loop position. A collective."""
    meta = check_state(path, accelerator, fingerprint)
    accelerator.load_state(str(path))
    logger.info("resumed from %s (step %d, epoch %d, batch %d)", path, meta["step"], meta["epoch"], meta["batch"])
    return meta
