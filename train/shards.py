"""WebDataset tar shards as indexed splits: the sample index every other part of slimforge keys on.

A WebDataset shard is a tar file whose members are grouped into samples by key (the member name up to the first dot
of its file name, the ``webdataset`` package's rule): ``000123.jpg`` + ``000123.cls`` is sample ``000123``. Each
sample here holds one image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ``.ppm``, ``.bmp``) and a label: ``.cls``
(the class index as text) or ``.json`` (an object whose ``data.label_column`` key is a class index or a class name).

:func:`index_shards` reads the shards' tar headers once (the image bytes are skipped, only the small label members
are read) and gives every sample a stable global index: the shards in the order the pattern lists them, the
samples in tar order. The index (per sample: shard, byte offset and size of the image, label) is cached beside the
shards in ``.slimforge-index-<digest>.npz``, keyed by the shards' paths, sizes and modification times and the class
list, so it is rebuilt when any of them changes. Every label is checked against the class list while indexing:
bad shards stop the run before any training starts.

:func:`shard_splits` turns the index into the same ``datasets.Dataset`` splits the other sources give (a
``ClassLabel`` column, the index column, an ``image`` that reads its bytes from the tar at its offset when a row is
read). Training streams the shards (:mod:`slimforge.train.streaming`); the validation split, the teacher cache and
calibration read rows by index.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slimforge.train.errors import DataError

if TYPE_CHECKING:
    from slimforge.train.data import DataConfig, Splits

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "ppm", "bmp"})
CLASS_FILES = ("classes.txt", "classes.json")
_FIX_SAMPLE = "write every sample as <key>.jpg (or .png ...) + <key>.cls (class index) or <key>.json"


def expand_shards(spec: str | list[str], where: str) -> list[str]:
    """The shard files ``spec`` names: a brace pattern (``train-{000000..000099}.tar``), a glob, or a list of
    either, in the order given (a glob's matches sorted).

    Raises:
        DataError: a pattern matches no file, or a listed file does not exist.
    """
    from braceexpand import braceexpand

    paths: list[str] = []
    for pattern in [spec] if isinstance(spec, str) else spec:
        if "://" in pattern:
            raise DataError(f"{where}: {pattern!r} is a URL", "copy the shards to a local or shared file system")
        for name in braceexpand(os.path.expanduser(pattern)):
            found = sorted(glob.glob(name)) if glob.has_magic(name) else [name] if os.path.isfile(name) else []
            if not found:
                raise DataError(
                    f"{where}: {name!r} matches no file",
                    "check the folder and the brace range (train-{000000..000099}.tar lists 100 shards), or use an "
                    "absolute path",
                )
            paths += [os.path.abspath(p) for p in found]
    return list(dict.fromkeys(paths))


def read_class_names(cfg: DataConfig, first_shard: str) -> tuple[list[str], str]:
    """The class list and where it came from: ``data.class_names``, else ``classes.txt`` (one name a line) or
    ``classes.json`` (a JSON list) in the folder of the first training shard.

    Raises:
        DataError: none of them is there, or the list is empty or repeats a name.
    """
    if cfg.class_names:
        names, source = list(cfg.class_names), "data.class_names"
    else:
        folder = Path(first_shard).parent
        found = [folder / f for f in CLASS_FILES if (folder / f).is_file()]
        if not found:
            raise DataError(
                f"no class list for the shards in {folder}: no {' or '.join(CLASS_FILES)} there and no "
                "data.class_names",
                "write classes.txt (one class name a line, line i = class index i) beside the shards, or set "
                "data.class_names=[...]",
            )
        text = found[0].read_text()
        names = json.loads(text) if found[0].suffix == ".json" else [n.strip() for n in text.splitlines() if n.strip()]
        source = str(found[0])
    if not names or len(set(names)) != len(names):
        raise DataError(f"the class list of {source} is empty or names a class twice", "list every class once")
    return [str(n) for n in names], source


@dataclass
class ShardIndex:
    """Every sample of a list of shards, in global-index order: sample ``g`` is in ``paths[shard[g]]``, its image
    ``size[g]`` bytes at byte ``offset[g]``, its class ``label[g]``."""

    paths: list[str]
    shard: np.ndarray  # [N] int32
    offset: np.ndarray  # [N] int64
    size: np.ndarray  # [N] int64
    label: np.ndarray  # [N] int64

    def counts(self) -> np.ndarray:
        """``[S]`` samples per shard."""
        return np.bincount(self.shard, minlength=len(self.paths))


def _label_of(name: str, ext: str, data: bytes, label_of: dict[str, int], label_key: str, where: str) -> int:
    if ext == "cls":
        value: object = data.decode().strip()
        value = int(value) if str(value).lstrip("-").isdigit() else value
    else:
        record = json.loads(data)
        if not isinstance(record, dict) or label_key not in record:
            fix = f"{_FIX_SAMPLE} holding {{{label_key!r}: <class index or name>}} (data.label_column names the key)"
            raise DataError(f"{where}: {name} has no {label_key!r} key", fix)
        value = record[label_key]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(label_of):
        return value
    if isinstance(value, str) and value in label_of:
        return label_of[value]
    raise DataError(
        f"{where}: sample {name} has class {value!r}, which is not in the class list ({len(label_of)} classes: "
        "index 0.." + f"{len(label_of) - 1} or one of their names)",
        "add the class to the class list (data.class_names, or classes.txt beside the shards) or remove the sample",
    )


def _scan(path: str, label_of: dict[str, int], label_key: str) -> tuple[list[int], list[int], list[int]]:
    """``(offsets, sizes, labels)`` of the samples of one shard, from its tar headers and label members."""
    from webdataset.tariterators import base_plus_ext

    offsets: list[int] = []
    sizes: list[int] = []
    labels: list[int] = []
    key = image = label = None

    def close() -> None:
        if key is None:
            return
        if image is None or label is None:
            missing = "an image" if image is None else "a .cls or .json label"
            raise DataError(f"shard {path}: sample {key!r} has no {missing}", _FIX_SAMPLE)
        offsets.append(image[0])
        sizes.append(image[1])
        labels.append(label)

    try:
        with tarfile.open(path, "r:") as tar:  # a seekable file: reads the headers, seeks over the data
            for member in tar:
                if not member.isfile():
                    continue
                name, ext = base_plus_ext(member.name)
                if name is None or (name.startswith("__") and name.endswith("__")):
                    continue
                ext = ext.lower()
                if name != key:  # WebDataset groups consecutive members with the same key into a sample
                    close()
                    key, image, label = name, None, None
                if ext in IMAGE_EXTENSIONS and image is None:
                    image = (member.offset_data, member.size)
                elif ext in ("cls", "json") and label is None:
                    data = tar.extractfile(member).read()
                    label = _label_of(member.name, ext, data, label_of, label_key, f"shard {path}")
            close()
    except (tarfile.TarError, OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"shard {path} cannot be read as a tar file: {e}", "rewrite the shard (tar cf ...)") from None
    if not offsets:
        raise DataError(
            f"shard {path} holds no sample (an image with a .cls or .json label)",
            f"remove it from data.shards or rewrite it: {_FIX_SAMPLE}",
        )
    return offsets, sizes, labels


def _cache_file(paths: list[str], class_names: list[str], label_key: str) -> Path:
    h = hashlib.sha256(json.dumps([class_names, label_key]).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return Path(paths[0]).parent / f".slimforge-index-{h.hexdigest()[:16]}.npz"


def index_shards(paths: list[str], class_names: list[str], label_key: str = "label") -> ShardIndex:
    """The :class:`ShardIndex` of ``paths``: read from the cache beside the shards when it matches them, else built
    by reading every shard's headers and written there. Under a launcher one process builds it while the others
    wait for it (a file lock beside the shards); a folder that cannot be written is indexed by every process.

    Raises:
        DataError: a shard cannot be read, is empty, or holds a sample without an image or label, or whose class
            is not in ``class_names``.
    """
    from filelock import FileLock

    cache = _cache_file(paths, class_names, label_key)
    try:
        lock = FileLock(str(cache.with_suffix(".lock")))
        lock.acquire()
    except OSError as e:
        logger.info("shard index not cached (%s): every launch indexes the shards again", e)
        return _build_index(paths, class_names, label_key, None)
    try:
        return _build_index(paths, class_names, label_key, cache)
    finally:
        lock.release()


def _build_index(paths: list[str], class_names: list[str], label_key: str, cache: Path | None) -> ShardIndex:
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return ShardIndex(list(paths), z["shard"], z["offset"], z["size"], z["label"])
    label_of = {name: i for i, name in enumerate(class_names)}
    parts = [_scan(p, label_of, label_key) for p in paths]
    index = ShardIndex(
        list(paths),
        np.concatenate([np.full(len(o), i, dtype=np.int32) for i, (o, _, _) in enumerate(parts)]),
        np.concatenate([np.asarray(o, dtype=np.int64) for o, _, _ in parts]),
        np.concatenate([np.asarray(s, dtype=np.int64) for _, s, _ in parts]),
        np.concatenate([np.asarray(lab, dtype=np.int64) for _, _, lab in parts]),
    )
    if cache is not None:
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        try:  # a complete file or none: written aside, then renamed
            np.savez(tmp, shard=index.shard, offset=index.offset, size=index.size, label=index.label)
            os.replace(tmp, cache)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            logger.info("shard index not cached (%s): every launch indexes the shards again", e)
    return index


_HANDLES: dict[str, int] = {}
_HANDLES_PID = [0]


def read_member(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of ``path``, through a file descriptor kept open per process (a shard is
    opened once per DataLoader worker, not once per image; ``pread`` keeps no file position, so threads may share
    it)."""
    if _HANDLES_PID[0] != os.getpid():  # a forked worker must not share its parent's descriptors' bookkeeping
        _HANDLES.clear()
        _HANDLES_PID[0] = os.getpid()
    fd = _HANDLES.get(path)
    if fd is None:
        fd = _HANDLES[path] = os.open(path, os.O_RDONLY)
    return os.pread(fd, size, offset)


def decode_image(data: bytes):
    """A PIL image from encoded bytes, loaded (not lazily bound to a buffer)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


class TarImage:
    """The image of one sample, read from its shard when ``convert`` (PIL's) or ``load`` is called."""

    __slots__ = ("path", "offset", "size")

    def __init__(self, path: str, offset: int, size: int) -> None:
        self.path, self.offset, self.size = path, offset, size

    def load(self):
        return decode_image(read_member(self.path, self.offset, self.size))

    def convert(self, mode: str):
        return self.load().convert(mode)


class ShardRows:
    """The ``datasets`` transform of a shard split: index rows → ``{"image": TarImage, "label", index}``."""

    def __init__(self, index: ShardIndex) -> None:
        self.index = index

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        from slimforge.train.data import INDEX_COLUMN

        paths = self.index.paths
        images = [TarImage(paths[s], o, n) for s, o, n in zip(batch["shard"], batch["offset"], batch["size"])]
        return {"image": images, "label": batch["label"], INDEX_COLUMN: batch[INDEX_COLUMN]}


def rows_of(ds) -> ShardRows | None:
    """The :class:`ShardRows` behind a shard split (``None`` for other datasets)."""
    transform = ds.format.get("format_kwargs", {}).get("transform") if ds.format.get("type") == "custom" else None
    return transform if isinstance(transform, ShardRows) else None


def _split(index: ShardIndex, class_names: list[str]):
    import datasets

    from slimforge.train.data import INDEX_COLUMN

    features = datasets.Features(
        {
            "shard": datasets.Value("int32"),
            "offset": datasets.Value("int64"),
            "size": datasets.Value("int64"),
            "label": datasets.ClassLabel(names=class_names),
            INDEX_COLUMN: datasets.Value("int64"),
        }
    )
    columns = {"shard": index.shard, "offset": index.offset, "size": index.size, "label": index.label}
    columns[INDEX_COLUMN] = np.arange(len(index.label), dtype=np.int64)
    return datasets.Dataset.from_dict({k: v.tolist() for k, v in columns.items()}, features).with_transform(
        ShardRows(index)
    )


def shard_splits(cfg: DataConfig) -> Splits:
    """``data.source: webdataset``: the training and validation shards (``data.shards``, keyed by
    ``data.train_split`` and ``data.val_split``, default ``validation``) as indexed splits.

    Raises:
        DataError: a split has no shards, a pattern matches nothing, a shard is bad or a label not in the class list.
    """
    from slimforge.train.data import Splits

    shards = cfg.shards or {}
    val_split = cfg.val_split or "validation"
    for split in (cfg.train_split, val_split):
        if split not in shards:
            raise DataError(
                f"data.shards has no {split!r} entry (it has {sorted(shards)})",
                f"set data.shards.{split}=<brace pattern or list of .tar shards> (a webdataset source evaluates on "
                "its own validation shards)",
            )
    train_paths = expand_shards(shards[cfg.train_split], f"data.shards.{cfg.train_split}")
    val_paths = expand_shards(shards[val_split], f"data.shards.{val_split}")
    class_names, source = read_class_names(cfg, train_paths[0])
    train = _split(index_shards(train_paths, class_names, cfg.label_column), class_names)
    val = _split(index_shards(val_paths, class_names, cfg.label_column), class_names)
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_val_samples is not None:
        val = val.select(range(min(cfg.max_val_samples, len(val))))
    logger.info(
        "webdataset: %d training images in %d shards, %d validation images in %d shards, %d classes from %s",
        len(train), len(train_paths), len(val), len(val_paths), len(class_names), source,
    )  # fmt: skip
    return Splits(train=train, val=val, class_names=class_names)
