"""Self-describing artifacts: the checkpoint's model description travels inside every exported file.

An ``.onnx`` carries it in the graph's ``metadata_props`` and a TorchScript file as an extra file of its archive,
both under :data:`KEY`, as the JSON of the checkpoint's ``slimforge.json`` (architecture, classes, input size,
normalisation, compression recipe, the dataset it was trained on). So a file copied alone to another machine is
still fed the right images and benchmarked against the right labels; ``model.json`` beside the artifacts is a
convenience copy for people, and the fallback for files exported without a description.

Example:
    >>> from slimforge.export.description import artifact_meta
    >>> artifact_meta(Path("elsewhere/model.onnx"))["model"]["input_size"]  # doctest: +SKIP
    [1, 32, 32]
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from slimforge.train.errors import ExportError, first_line

KEY = "slimforge.model"
"""The ``metadata_props`` key (ONNX) and the extra-file name (TorchScript) of the description."""
MODEL_JSON = "model.json"
"""The convenience copy export.py writes beside the artifacts."""
CHECKPOINT_KIND = "checkpoint"


def embed_onnx(path: str | os.PathLike, description: dict[str, Any]) -> None:
    """Writes ``description`` into the ONNX file's ``metadata_props`` (replacing an older one), in place.

    Raises:
        ExportError: the file is not a readable ONNX model.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for a corrupted protobuf
        raise ExportError(f"cannot read {path} as ONNX: {first_line(e)}", "re-export it") from None
    props = [p for p in model.metadata_props if p.key != KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    model.metadata_props.add(key=KEY, value=json.dumps(description, sort_keys=True))
    onnx.save(model, str(path))


def torchscript_extra_files(description: dict[str, Any]) -> dict[str, str]:
    """The ``_extra_files`` mapping that stores ``description`` in a TorchScript archive (``torch.jit.save``)."""
    return {KEY: json.dumps(description, sort_keys=True)}


def read_embedded(path: str | os.PathLike) -> dict[str, Any] | None:
    """The description stored inside an ``.onnx`` / ``.ts`` / ``.pt`` file, or None when it holds none.

    TorchScript archives are read as zip files (``<archive>/extra/<KEY>``): nothing in them is unpickled.

    Raises:
        ExportError: the file holds a description that is not valid JSON.
    """
    path = Path(path)
    text = None
    if path.suffix.lower() == ".onnx":
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # not readable as ONNX: the runtime that loads it reports that
            return None
        text = next((p.value for p in model.metadata_props if p.key == KEY), None)
    elif path.suffix.lower() in (".ts", ".pt") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.split("/", 1)[-1] == f"extra/{KEY}"), None)
            text = archive.read(name).decode() if name else None
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: its embedded model description is corrupted ({e})", "re-export it") from None


def artifact_meta(path: Path) -> dict[str, Any]:
    """The model description of an artifact: a checkpoint's own JSON, the one embedded in an exported file, or
    (for files exported without one) the ``model.json`` beside it.

    Raises:
        CheckpointError / ExportError: it is missing or unreadable.
    """
    from slimforge.train.checkpoint import read_meta

    if path.is_dir():
        return read_meta(path)
    if not path.is_file():
        raise ExportError(f"artifact {str(path)!r} does not exist", "check the path (export/export.py writes them)")
    embedded = read_embedded(path)
    if embedded is not None:
        return embedded
    model_json = path.parent / MODEL_JSON
    if not model_json.is_file():
        raise ExportError(
            f"{path} carries no model description and there is no {MODEL_JSON} beside it: its input size, "
            "normalisation and classes are unknown",
            f"benchmark artifacts written by export/export.py (they carry it), or copy the source checkpoint's "
            f"slimforge.json beside it as {MODEL_JSON}",
        )
    try:
        return json.loads(model_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{model_json} is corrupted ({e})", "re-run export/export.py") from None
