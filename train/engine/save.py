"""The end of a run: the student's final checkpoint and ``summary.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from slimforge.train.checkpoint import save_checkpoint
from slimforge.train.models import ModelSpec

logger = logging.getLogger(__name__)


def save_final(
    accelerator,
    model: nn.Module,
    spec: ModelSpec,
    out: Path,
    summary: dict[str, Any],
    extra: dict[str, Any],
    prefix: str = "",
) -> Path:
    """Writes ``out/checkpoint`` (atomically) and ``out/summary.json`` from the main process.

    A collective: under DeepSpeed / FSDP the weights are gathered from the shards, so every rank calls it. Under
    DeepSpeed the saved weights are its FP32 masters, whatever precision the module was trained in.

    Args:
        accelerator: The run's ``Accelerator``.
        model: The prepared (wrapped) student.
        spec: The student's architecture, with its compression recipe.
        out: The run folder.
        summary: The run summary, stored in the checkpoint and in ``summary.json``.
        extra: More JSON facts for the checkpoint (the data config, the resolved run config).
        prefix: Save only the entries under this prefix, without it (``"student."``: the student of a
            :class:`slimforge.train.task.StudentWithAdapters`, without the task's adapters).

    Returns:
        The checkpoint folder.
    """
    from slimforge.train.checkpoint import non_finite
    from slimforge.train.engine.outputs import from_rank0
    from slimforge.train.engine.precision import final_state_dict
    from slimforge.train.engine.step import DivergenceError

    final = out / "checkpoint"
    state = final_state_dict(accelerator, model)  # DeepSpeed: its FP32 masters
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    # Every rank learns rank 0's verdict, so none waits for the others.
    bad = from_rank0(accelerator, non_finite(state) if accelerator.is_main_process else [])
    if bad:
        raise DivergenceError(
            f"the trained student holds non-finite values (nan/inf) in {', '.join(bad[:3])}; no checkpoint was written",
            "lower optim.lr, set optim.grad_clip, and relaunch",
        )
    if accelerator.is_main_process:
        save_checkpoint(state, spec, final, extra={**extra, "summary": summary})
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.info("wrote %s", final)
    accelerator.wait_for_everyone()
    return final
