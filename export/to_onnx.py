"""ONNX export through ``torch.export`` (the dynamo exporter) with a dynamic batch axis.

The graph takes one input ``input`` ``[batch, C, H, W]`` and returns ``logits`` ``[batch, K]``; weights are stored
inside the single ``.onnx`` file (no external data), so the file alone is the artifact.

Example:
    >>> from slimforge.export.to_onnx import export_onnx
    >>> export_onnx(model.eval(), images[:2], "out/model.onnx", opset=18)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from slimforge.train.errors import ExportError, first_line

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 17


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, opset: int = 18) -> Path:
    """Writes ``model`` as ONNX to ``path`` and checks the file with ``onnx.checker``.

    Args:
        model: The model in eval mode, on CPU.
        example: ``[B, C, H, W]`` example batch with ``B >= 2`` (a batch of 1 lets the exporter specialise the
            batch axis to 1).
        path: Output file. The caller renames it into place once parity passes.
        opset: ONNX opset, at least 17 (LayerNormalization, needed by ViTs, is opset 17).

    Raises:
        ExportError: the model cannot be exported or the written graph is invalid.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"ONNX opset {opset} is too old", f"use --opset {MIN_OPSET} or newer")
    if example.shape[0] < 2:
        raise ExportError("the ONNX example batch has one image", "pass an example batch of at least 2 images")
    try:
        import onnx
    except ImportError as e:
        raise ExportError(f"onnx cannot be imported ({e})", "pip install onnx onnxscript") from None
    path = Path(path)
    batch = torch.export.Dim("batch")
    try:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            # Positional: the forward's argument name differs between model libraries.
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    except Exception as e:  # torch.export / onnxscript raise many types; the first line names the cause
        logger.debug("ONNX export traceback", exc_info=True)
        raise ExportError(
            f"ONNX export failed: {first_line(e, 400)}",
            "the model must be traceable by torch.export with a dynamic batch axis (no data-dependent Python "
            "control flow, no batch-size specialisation); run with -v for the full traceback",
        ) from None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # onnx.checker.ValidationError and shape-inference errors
        raise ExportError(f"exported ONNX graph {path} is invalid: {first_line(e, 400)}", "report a bug") from None
    return path
