"""Resumable training state: Accelerate's ``save_state`` folders, written atomically, found newest-first.

A state folder ``output_dir/state/step_00000120/`` holds what ``accelerator.save_state`` writes (model,
optimizer — sharded under DeepSpeed — and every rank's RNG states) plus ``slimforge_state.json`` with the loop
position. It is written under a temporary name and renamed once every rank has finished, so the newest folder
with that JSON is always complete. Nothing here is unpickled with ``weights_only=False``: Accelerate loads
these files with ``weights_only=True``.
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


def state_dirs(root: Path) -> list[Path]:
    """Complete state folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_META).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def save_train_state(accelerator, root: Path, position: dict[str, Any], keep: int) -> Path:
    """Saves the full training state of every rank; a collective (all ranks call it)."""
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
        meta = dict(position, world_size=accelerator.num_processes, distributed_type=str(accelerator.distributed_type))
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


def check_state(path: Path, accelerator) -> dict[str, Any]:
    """The loop position stored in ``path``; raises if any rank's RNG or the optimizer state is missing."""
    meta = json.loads((path / STATE_META).read_text())
    fix = f"delete {path} to resume from an older state, or start a new run in another train.output_dir"
    if meta["world_size"] != accelerator.num_processes:
        raise SlimforgeError(
            f"{path} was saved by {meta['world_size']} processes, this run has {accelerator.num_processes}: "
            "per-rank RNG and data positions cannot be mapped",
            f"relaunch with {meta['world_size']} processes, or {fix}",
        )
    missing = [
        f"random_states_{r}.pkl" for r in range(meta["world_size"]) if not (path / f"random_states_{r}.pkl").exists()
    ]
    has_optimizer = (path / "optimizer.bin").exists() or any(path.glob("pytorch_model*/*optim_states.pt"))
    if not has_optimizer:
        missing.append("optimizer state")
    if missing:
        raise SlimforgeError(f"training state {path} is missing {', '.join(missing)}", fix)
    return meta


def load_train_state(accelerator, root: Path) -> dict[str, Any] | None:
    """Restores the newest complete state under ``root``; returns its loop position, or None to start fresh."""
    found = state_dirs(root)
    if not found:
        return None
    path = found[-1]
    meta = check_state(path, accelerator)
    accelerator.load_state(str(path))
    logger.info("resumed from %s (step %d, epoch %d, batch %d)", path, meta["step"], meta["epoch"], meta["batch"])
    return meta
