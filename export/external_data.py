"""An ONNX file is data: every external-data file it names must lie inside its own folder.

An ONNX model may keep tensors in other files: a ``TensorProto`` with ``data_location: EXTERNAL`` names one in its
``external_data`` ``location``, a path relative to the model's folder. A crafted model can name
``../../home/user/.ssh/id_rsa``, an absolute path, a symlink or a hard link to any file; a runtime that follows
it reads that file into the model's weights, and so into its outputs. Recent runtimes refuse such paths (ONNX
Runtime from 1.24, the ``onnx`` package's loader from 1.21, OpenVINO's ONNX reader; see docs/benchmark.md), and
slimforge checks every reference itself before any runtime opens the file, whatever the runtime's version: the
initializers, sparse initializers, tensors in node attributes, and the same in every subgraph and function.

Example:
    >>> from slimforge.export.external_data import check_external_data
    >>> check_external_data("untrusted/model.onnx")  # doctest: +SKIP
    Traceback (most recent call last):
    slimforge.train.errors.ExportError: ONNX file untrusted/model.onnx names external data outside its folder: ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath
from typing import Any

from slimforge.train.errors import ExportError


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        for sparse in [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []:
            yield from (sparse.values, sparse.indices)
        for sparse in attr.sparse_tensors:
            yield from (sparse.values, sparse.indices)
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for sub in attr.graphs:
            yield from _graph_tensors(sub)


def external_locations(model: Any) -> Iterator[tuple[str, str]]:
    """``(tensor name, location)`` of every tensor of an ``onnx.ModelProto`` whose data lives in another file."""
    import onnx

    tensors = list(_graph_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            tensors.extend(_node_tensors(node))
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            yield tensor.name, entries.get("location", "")


def _escape(location: str, folder: str) -> str | None:
    """Why ``location`` is not a file inside ``folder`` (already resolved), or None when it is."""
    if not location:
        return "an empty location"
    if os.path.isabs(location) or PureWindowsPath(location).anchor:
        return "an absolute path"
    resolved = os.path.realpath(os.path.join(folder, location))
    if os.path.commonpath([resolved, folder]) != folder:
        return f"a path that resolves to {resolved}"
    if os.path.isfile(resolved) and os.stat(resolved).st_nlink > 1:
        return f"a file with {os.stat(resolved).st_nlink} hard links (one may be a file elsewhere)"
    return None


def check_external_data(path: str | os.PathLike) -> None:
    """Refuses an ONNX file any of whose external-data locations is empty, absolute, resolves outside the file's
    folder (``..``, a symlink), or is a hard-linked file. A file that is not readable as ONNX is left to the runtime
    that loads it, which reports it.

    Raises:
        ExportError: naming the tensor and the location.
    """
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not readable as ONNX: the runtime that loads it names the problem
        return
    folder = os.path.realpath(path.parent)
    for name, location in external_locations(model):
        why = _escape(location, folder)
        if why is not None:
            raise ExportError(
                f"ONNX file {path} names external data outside its folder: tensor {name!r} reads {location!r}, "
                f"{why}; slimforge opens no file a model names outside the model's own folder",
                "keep every external-data file of the model in its folder under a plain relative name "
                "(onnx.save_model(..., save_as_external_data=True, location='model.onnx.data')), or re-export it "
                "with export/export.py",
            )
