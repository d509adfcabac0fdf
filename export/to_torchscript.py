"""TorchScript export by tracing, optionally frozen (weights folded into the graph as constants).

Tracing records the operations one example batch runs: Python control flow that depends on values or on the
batch size is baked in. The tracer's warnings about it are logged, and the parity check on real images at
several batch sizes is what catches an artifact that did not generalise.

Example:
    >>> from slimforge.export.to_torchscript import export_torchscript
    >>> export_torchscript(model.eval(), images[:2], "out/model.ts", freeze=True)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from slimforge.train.errors import ExportError, first_line

logger = logging.getLogger(__name__)


def export_torchscript(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    freeze: bool = True,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Traces ``model`` on ``example`` and saves it with ``torch.jit.save``.

    Args:
        model: The model in eval mode, on CPU.
        example: ``[B, C, H, W]`` example batch (B >= 2, so shape arithmetic on the batch axis is traced).
        path: Output file. The caller renames it into place once parity passes.
        freeze: Inline the weights and fold eval-mode BatchNorm (``torch.jit.freeze``); faster to run.
        extra_files: Name → text stored in the archive beside the graph (the model description).

    Raises:
        ExportError: tracing or freezing fails.
    """
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # A traced convolution keeps cuDNN's TF32 switch of the moment it was traced as a constant of the graph
            # (aten::_convolution's allow_tf32), which no runtime flag changes later; PyTorch's default is True.
            # Trace with it off, so the file computes in strict FP32 on a GPU as on the CPU.
            tf32 = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
            try:
                with torch.no_grad():
                    # check_trace re-runs the trace on the same input only; verify.py checks other batches instead.
                    module = torch.jit.trace(model, example, check_trace=False)
                    if freeze:
                        module = torch.jit.freeze(module.eval())
            finally:
                torch.backends.cudnn.allow_tf32 = tf32
            torch.jit.save(module, str(path), _extra_files=extra_files or {})
        except Exception as e:  # tracing raises RuntimeError/TypeError/ValueError for untraceable models
            logger.debug("TorchScript export traceback", exc_info=True)
            raise ExportError(
                f"TorchScript export failed: {first_line(e, 400)}",
                "the model's forward must take one tensor and return a tensor (or a tuple of them)",
            ) from None
    # torch.jit's own deprecation notices are noise here; tracer warnings say the trace may not generalise.
    for message in {str(w.message).strip().splitlines()[0] for w in caught if w.category is not FutureWarning}:
        logger.warning("TorchScript trace: %s", message)
    return path
