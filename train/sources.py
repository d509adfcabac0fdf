"""Datasets stored as files: a ``save_to_disk`` folder (``data.source: disk``) and parquet files
(``data.source: parquet``), both read locally into the ``DatasetDict`` the indexed path takes; and the config checks
of every file-backed source (these two and ``webdataset``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from slimforge.train.errors import DataError, first_line

if TYPE_CHECKING:
    from slimforge.train.data import DataConfig


def source_problems(cfg: DataConfig) -> list[str]:
    """What a ``disk``, ``parquet`` or ``webdataset`` source lacks in ``cfg``, one line per field."""
    p = []
    if cfg.source == "disk" and not cfg.path:
        p.append("path: source 'disk' needs data.path=<folder written by datasets' save_to_disk>")
    if cfg.source == "parquet" and not (cfg.path or cfg.shards):
        p.append("path: source 'parquet' needs data.path=<folder of parquet files> or data.shards={train: ...}")
    if cfg.source == "webdataset":
        if not cfg.shards:
            p.append(
                "shards: source 'webdataset' needs data.shards={train: <pattern of .tar shards>, validation: <...>}"
            )
        if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
            p.append(
                "mixup_alpha / cutmix_alpha: a webdataset source streams its samples and cannot read a mixing "
                "partner by index; set both to 0, or convert the shards to parquet (source 'parquet')"
            )
    return p


def load_files(cfg: DataConfig):
    """The ``DatasetDict`` of a ``disk`` or ``parquet`` source (a single saved ``Dataset`` is the ``train`` split).

    Raises:
        DataError: the folder or files are missing or are not what the source reads.
    """
    import datasets

    if cfg.source == "disk":
        root = Path(cfg.path or "")
        try:
            loaded = datasets.load_from_disk(str(root))
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise DataError(
                f"data.path {str(root)!r} is not a dataset saved with save_to_disk ({first_line(e)})",
                "point data.path at the folder Dataset.save_to_disk / DatasetDict.save_to_disk wrote",
            ) from None
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    from slimforge.train.shards import expand_shards

    if cfg.shards:
        files = {split: expand_shards(spec, f"data.shards.{split}") for split, spec in cfg.shards.items()}
        return datasets.load_dataset("parquet", data_files=files)
    root = Path(cfg.path or "")
    if not root.is_dir() or not any(root.rglob("*.parquet")):
        raise DataError(
            f"data.path {str(root)!r} is not a folder holding .parquet files",
            "point data.path at the folder (files named train-*.parquet, validation-*.parquet ...) or list the "
            "files per split in data.shards",
        )
    return datasets.load_dataset("parquet", data_dir=str(root))


def named_labels(ds, class_names: list[str]):
    """``ds`` with its ``label`` column a ``ClassLabel`` of ``class_names`` (from integer indices or names).

    Raises:
        DataError: the column already names other classes, or holds a value outside ``class_names``.
    """
    import datasets

    feature = ds.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        if list(feature.names) != list(class_names):
            raise DataError(
                f"the label column already names its classes {feature.names[:5]}..., data.class_names "
                f"{list(class_names)[:5]}...",
                "drop data.class_names (the dataset's own ClassLabel is used) or make them equal",
            )
        return ds
    try:
        return ds.cast_column("label", datasets.ClassLabel(names=list(class_names)))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"the label column ({feature}) does not fit data.class_names ({len(class_names)} classes): {first_line(e)}",
            "give every class the labels use, in index order, in data.class_names",
        ) from None
