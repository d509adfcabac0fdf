"""The run folder, decided once for every rank: is there a finished run, can it be written, do all ranks see it.

Each answer is rank 0's, broadcast (or every rank's, gathered), so ranks reading a lagging or unshared filesystem
never take different branches and wait forever in a collective the others left: they all stop with the same
message instead. Every function here is a collective (all ranks call it).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path

from slimforge.train.errors import SlimforgeError, check_writable

logger = logging.getLogger(__name__)


def from_rank0(accelerator, value):
    """Rank 0's ``value`` on every rank (a collective with more than one process)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def blind_ranks(accelerator, sees: bool) -> tuple[list[str], str]:
    """Every rank's ``sees``, gathered: ``(["rank R on HOST", ...] for the ranks where it is False, rank 0's host)``.
    A collective."""
    from accelerate.utils import gather_object

    seen = gather_object([(sees, accelerator.process_index, socket.gethostname())])
    return [f"rank {rank} on {host}" for ok, rank, host in seen if not ok], seen[0][2]


def _unwritable(out: Path) -> tuple[str, str] | None:
    """None when ``out`` can be created and written, else the error's (problem, fix)."""
    try:
        check_writable(out, "train.output_dir")
    except SlimforgeError as e:
        return e.problem, e.fix
    return None


def prepare_run_folder(accelerator, out: Path, overwrite: bool) -> None:
    """Checks the run folder before any work: no finished run there (unless ``overwrite``), writable, and (with
    more than one process) the same folder for every rank.

    Raises:
        SlimforgeError: on every rank alike.
    """
    finished = from_rank0(accelerator, accelerator.is_main_process and (out / "checkpoint").exists())
    if finished and not overwrite:
        raise SlimforgeError(
            f"{out / 'checkpoint'} already holds a finished run",
            "choose another train.output_dir or set train.overwrite=true",
        )
    problem = from_rank0(accelerator, _unwritable(out) if accelerator.is_main_process else None)
    if problem is not None:
        raise SlimforgeError(*problem)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    if accelerator.num_processes > 1:
        check_shared(accelerator, out)


def check_shared(accelerator, out: Path) -> None:
    """Rank 0 writes a random token into ``out``; every rank must read it back. A multi-node launch whose
    ``out`` is a node-local folder fails here, naming the ranks and hosts that cannot see it."""
    token = from_rank0(accelerator, secrets.token_hex(8) if accelerator.is_main_process else None)
    marker = out / f".shared-check-{token}"
    if accelerator.is_main_process:
        marker.write_text(token)
    accelerator.wait_for_everyone()
    try:
        sees = marker.read_text() == token
    except OSError:
        sees = False
    blind, host0 = blind_ranks(accelerator, sees)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    if blind:
        raise SlimforgeError(
            f"train.output_dir {out} is not shared: {', '.join(blind)} cannot see what rank 0 "
            f"(on {host0}) writes there, so checkpoints, resumable states and metrics would split across nodes",
            "put train.output_dir on a filesystem every node mounts at the same path (NFS, Lustre, ...)",
        )


def newest_state(accelerator, root: Path) -> Path | None:
    """The newest complete state under ``root`` as rank 0 sees it, broadcast to every rank; a collective.

    Raises:
        SlimforgeError: on every rank, when some rank cannot see rank 0's choice (``output_dir`` is not on a
            filesystem every node shares, or it lags).
    """
    from slimforge.train.state import STATE_META, state_dirs

    found = state_dirs(root) if accelerator.is_main_process else []
    name = from_rank0(accelerator, found[-1].name if found else None)
    if name is None:
        return None
    path = root / name
    if accelerator.num_processes > 1:
        blind, _ = blind_ranks(accelerator, (path / STATE_META).is_file())
        if blind:
            raise SlimforgeError(
                f"rank 0 resumes from {path}, which {', '.join(blind)} cannot see: train.output_dir is not on a "
                "filesystem every node shares",
                "put train.output_dir on a shared filesystem (every rank reads the same states), or launch on one node",
            )
    return path


def cuda_unusable_reason() -> str | None:
    """Why this node has NVIDIA GPUs that torch cannot use, or None (no GPU, or CUDA works).

    GPUs are taken to be present when the driver exposes device nodes (``/dev/nvidia0`` ...) or the scheduler
    assigned some (``CUDA_VISIBLE_DEVICES`` lists device ids).
    """
    import torch

    if torch.cuda.is_available():
        return None
    devices = sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    assigned = visible not in ("", "-1") and all(v.strip() for v in visible.split(","))
    if not devices and not assigned:
        return None
    seen = ", ".join(devices[:4]) if devices else f"CUDA_VISIBLE_DEVICES={visible}"
    if torch.version.cuda is None:
        return f"this node has GPUs ({seen}) but torch {torch.__version__} is a CPU-only build"
    return f"this node has GPUs ({seen}) but torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use them"
