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
    accelerator, model: nn.Module, spec: ModelSpec, out: Path, summary: dict[str, Any], extra: dict[str, Any]
) -> Path:
    """Writes ``out/checkpoint`` (atomically) and ``out/summary.json`` from the main process.

    A collective: under DeepSpeed ZeRO-3 / FSDP ``get_state_dict`` gathers the shards, so every rank calls it.

    Args:
        accelerator: The run's ``Accelerator``.
        model: The prepared (wrapped) student.
        spec: The student's architecture, with its compression recipe.
        out: The run folder.
        summary: The run summary, stored in the checkpoint and in ``summary.json``.
        extra: More JSON facts for the checkpoint (the data config, the resolved run config).

    Returns:
        The checkpoint folder.
    """
    final = out / "checkpoint"
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_checkpoint(state, spec, final, extra={**extra, "summary": summary})
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.info("wrote %s", final)
    accelerator.wait_for_everyone()
    return final
