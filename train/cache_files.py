"""The teacher cache's files (:mod:`slimforge.train.teacher_cache`): layout, size, writer, memory-mapped reader.

Layout of ``cache.path`` (format version 2): ``cache.json`` (what it holds, written last: a folder without it is
incomplete) and, per rank r of the caching launch, which owns the contiguous samples ``shards[r] = [start, stop)``,
three raw ``.npy`` files, epoch-major: ``rank_RRRRR.values.npy`` ``[E, stop - start, k]`` (``cache.dtype``),
``rank_RRRRR.indices.npy`` ``[E, stop - start, k]`` (uint8, int16 or int32) and ``rank_RRRRR.lse.npy``
``[E, stop - start]`` (float32). Sample i of epoch e is row ``i - start`` of slice ``e``: no key table. Ranks write
with plain appends; readers memory-map one epoch's slices at a time (:class:`CacheReader`), so a reader's resident
memory is bounded by two epochs' entries, whatever the number of epochs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from slimforge.train.errors import SlimforgeError

CACHE_FORMAT = "slimforge.teacher_cache"
CACHE_VERSION = 2  # 1: safetensors shards keyed by (epoch, index), read whole into every rank's memory
META = "cache.json"
ARRAYS = ("values", "indices", "lse")
VALUE_DTYPES = {"fp16": np.float16, "fp32": np.float32}
# Epochs a reader keeps mapped: the current one and the one before (a batch may straddle an epoch's end).
MAPPED_EPOCHS = 2


def index_dtype(num_classes: int) -> np.dtype:
    """The narrowest integer dtype that holds a class index: uint8 up to 256 classes, int16 up to 32,768, else
    int32."""
    if num_classes <= 2**8:
        return np.dtype(np.uint8)
    return np.dtype(np.int16) if num_classes <= 2**15 else np.dtype(np.int32)


def shard_ranges(num_samples: int, ranks: int) -> list[tuple[int, int]]:
    """Rank r's contiguous share ``[start, stop)`` of the sample indices (sizes differ by at most one)."""
    bounds = [num_samples * r // ranks for r in range(ranks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def cache_layout(epochs: int, num_samples: int, num_classes: int, topk: int, dtype: str, ranks: int) -> dict:
    """What ``cache.json`` records of the files: the shape of the cache and each rank's share."""
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "epochs": epochs,
        "num_samples": num_samples,
        "num_classes": num_classes,
        "topk": topk,
        "dtype": dtype,
        "index_dtype": index_dtype(num_classes).name,
        "ranks": ranks,
        "shards": [list(r) for r in shard_ranges(num_samples, ranks)],
    }


def _arrays(layout: dict, rank: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each of rank ``rank``'s files."""
    start, stop = layout["shards"][rank]
    e, n, k = layout["epochs"], stop - start, layout["topk"]
    values = np.dtype(VALUE_DTYPES[layout["dtype"]])
    return {"values": ((e, n, k), values), "indices": ((e, n, k), np.dtype(layout["index_dtype"])),
            "lse": ((e, n), np.dtype(np.float32))}  # fmt: skip


def shard_file(folder: Path, rank: int, name: str) -> Path:
    return folder / f"rank_{rank:05d}.{name}.npy"


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(dtype)
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def cache_bytes(layout: dict) -> int:
    """The exact size on disk of the cache's array files (``cache.json``, a few KB, aside)."""
    return sum(
        len(_npy_header(shape, dtype)) + int(np.prod(shape)) * dtype.itemsize
        for rank in range(layout["ranks"])
        for shape, dtype in _arrays(layout, rank).values()
    )


def check_free_space(path: str | os.PathLike, needed: int, free: int | None = None) -> None:
    """Refuses a cache of ``needed`` bytes when the file system of ``path`` (or of its nearest existing parent)
    has less free space (``free``: measured with :func:`shutil.disk_usage` unless given).

    Raises:
        SlimforgeError: the cache does not fit, with both figures and the fix.
    """
    if free is None:
        where = Path(path).absolute()
        while not where.exists():
            where = where.parent
        free = shutil.disk_usage(where).free
    if needed > free:
        raise SlimforgeError(
            f"the teacher cache needs {needed / 1e9:.2f} GB ({needed} bytes) and {path} has {free / 1e9:.2f} GB "
            f"({free} bytes) free",
            "cache fewer epochs (cache.epochs), keep fewer classes per sample (cache.topk), or point cache.path at "
            "a file system with more space",
        )


class ShardWriter:
    """One rank's share of the cache, appended in the order the rank computes it: epoch by epoch, its samples
    ``shards[rank]`` in index order. Plain buffered writes, not a writable memmap, whose dirty pages would count in
    the writer's resident memory: the writer holds one batch.

    Args:
        folder: Where the rank's files go (the cache's ``.partial`` folder).
        layout: :func:`cache_layout`.
        rank: This rank.

    Example:
        >>> writer = ShardWriter(tmp, layout, rank)
        >>> writer.append(epoch, index, values, indices, lse)  # [B], [B], [B, k], [B, k], [B], in order
        >>> writer.close()
    """

    def __init__(self, folder: str | os.PathLike, layout: dict, rank: int) -> None:
        self.start, stop = layout["shards"][rank]
        self.rows, self.total, self.written = stop - self.start, layout["epochs"] * (stop - self.start), 0
        self.dtype = layout["dtype"]
        self.arrays = _arrays(layout, rank)
        self.files = {}
        for name, (shape, dtype) in self.arrays.items():
            self.files[name] = open(shard_file(Path(folder), rank, name), "wb")  # noqa: SIM115 (closed in close())
            self.files[name].write(_npy_header(shape, dtype))

    def append(self, epoch, index, values, indices, lse) -> None:
        """Appends the entries of ``(epoch [B], index [B])``, which must be the next B of this rank's order:
        ``values [B, k]``, ``indices [B, k]``, ``lse [B]`` (numpy arrays or CPU tensors).

        Raises:
            SlimforgeError: a logit does not fit ``cache.dtype``.
            RuntimeError: the entries are not the next ones of this rank's share.
        """
        epoch, index = np.asarray(epoch), np.asarray(index)
        if len(index) == 0:
            return
        pos = np.arange(self.written, self.written + len(index))
        expected = (pos // max(self.rows, 1), self.start + pos % max(self.rows, 1))
        if not (np.array_equal(epoch, expected[0]) and np.array_equal(index, expected[1]) and pos[-1] < self.total):
            raise RuntimeError(f"cache entries out of order: expected positions {pos[0]}..{pos[-1]} of {self.total}")
        with np.errstate(over="ignore"):  # a logit beyond fp16's range becomes inf: refused just below
            out = {
                name: np.ascontiguousarray(a, dtype=self.arrays[name][1])
                for name, a in zip(ARRAYS, (values, indices, lse))
            }
        if not np.isfinite(out["values"]).all():
            largest = float(np.abs(np.asarray(values, dtype=np.float64)).max())
            raise SlimforgeError(
                f"a teacher logit (|{largest:.4g}|) is not finite in cache.dtype {self.dtype}",
                "set cache.dtype=fp32 (fp16 holds up to 65504), or check the teacher's outputs",
            )
        for name, a in out.items():
            self.files[name].write(a.data)
        self.written += len(index)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        if self.written != self.total:
            raise RuntimeError(f"rank share incomplete: {self.written} of {self.total} entries written")


def commit_cache(partial: Path, out: Path, meta: dict) -> dict:
    """Writes ``cache.json`` into the complete ``partial`` folder, last, and moves it to ``out`` (replacing a
    previous cache there): the complete cache appears at once. Returns ``meta`` with ``bytes`` added."""
    meta = {**meta, "bytes": sum(p.stat().st_size for p in partial.glob("rank_*.npy"))}
    (partial / META).write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return meta


class CacheReader:
    """A complete cache folder, read memory-mapped: lookups by ``(epoch, sample index)``.

    Only the slices of the epochs being looked up are mapped (at most :data:`MAPPED_EPOCHS` at once; older ones
    are unmapped, and their pages leave the process's resident memory with them), so a reader holds at most
    two epochs' entries, 44 bytes per sample at top-10 of 1,000 classes in fp16, whatever the number of epochs.

    Args:
        path: The cache folder.
        device: Where lookups land.
        build: The command that (re)builds the cache, for the messages.

    Raises:
        SlimforgeError: the folder holds no complete cache, a cache of another format version, or lacks files.
    """

    def __init__(self, path: str | os.PathLike, device="cpu", build: str = "") -> None:
        path = Path(path)
        build = build or f"build it: accelerate launch train/cache_teacher.py --config <run config> cache.path={path}"
        if not (path / META).is_file():
            state = "is incomplete (its writing did not finish)" if path.is_dir() else "does not exist"
            raise SlimforgeError(f"the teacher cache {path} {state}: no {META}", build)
        meta = json.loads((path / META).read_text())
        if meta.get("format") != CACHE_FORMAT:
            raise SlimforgeError(f"{path}/{META} is not a slimforge teacher cache", build)
        if meta.get("version") != CACHE_VERSION:
            raise SlimforgeError(
                f"the teacher cache {path} has format version {meta.get('version')}; this slimforge reads version "
                f"{CACHE_VERSION} (memory-mapped .npy shards)",
                f"recompute it with train.overwrite=true ({build})",
            )
        self.path, self.meta, self.device = path, meta, device
        self.k, self.num_classes, self.epochs = meta["topk"], meta["num_classes"], meta["epochs"]
        self.num_samples = meta["num_samples"]
        self.random_views = meta.get("random_views", True)
        self.temperature = meta.get("temperature")
        self._starts = np.array([s for s, _ in meta["shards"]], dtype=np.int64)
        self._stops = np.array([s for _, s in meta["shards"]], dtype=np.int64)
        self._files: list[dict[str, tuple[Path, int, tuple[int, ...], np.dtype]]] = []
        for rank in range(meta["ranks"]):
            files = {}
            for name, (shape, dtype) in _arrays(meta, rank).items():
                file = shard_file(path, rank, name)
                files[name] = (file, self._header(file, shape, dtype, build), shape, dtype)
            self._files.append(files)
        self._maps: OrderedDict[int, list[dict[str, np.memmap] | None]] = OrderedDict()

    def _header(self, file: Path, shape: tuple[int, ...], dtype: np.dtype, build: str) -> int:
        """Checks a file's .npy header and size; returns where its data starts."""
        if not file.is_file():
            raise SlimforgeError(f"the teacher cache {self.path} lacks {file.name}", f"recompute it ({build})")
        with open(file, "rb") as f:
            np.lib.format.read_magic(f)
            found = np.lib.format.read_array_header_1_0(f)[::2]
            offset = f.tell()
        size = offset + int(np.prod(shape)) * dtype.itemsize
        if found != (shape, dtype) or file.stat().st_size != size:
            raise SlimforgeError(
                f"{file} holds {found[1]} {list(found[0])} ({file.stat().st_size} bytes), its cache.json says "
                f"{dtype} {list(shape)} ({size} bytes)",
                f"recompute it ({build})",
            )
        return offset

    def mapped(self, epoch: int) -> list[dict[str, np.memmap] | None]:
        """Epoch ``epoch``'s slice of every rank's files, memory-mapped (None for a rank without samples)."""
        if epoch not in self._maps:
            while len(self._maps) >= MAPPED_EPOCHS:
                self._maps.popitem(last=False)  # unmapped once no lookup result refers to it (results are copies)
            self._maps[epoch] = [self._map(files, epoch) for files in self._files]
        self._maps.move_to_end(epoch)
        return self._maps[epoch]

    @staticmethod
    def _map(files: dict, epoch: int) -> dict[str, np.memmap] | None:
        maps = {}
        for name, (file, offset, shape, dtype) in files.items():
            if shape[1] == 0:
                return None
            step = int(np.prod(shape[1:])) * dtype.itemsize  # bytes of one epoch's slice
            maps[name] = np.memmap(file, dtype=dtype, mode="r", offset=offset + epoch * step, shape=shape[1:])
        return maps

    def lookup(self, epoch: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values [B, k] float32, indices [B, k] int64, lse [B] float32)`` of the samples ``index`` ``[B]`` at
        ``epoch`` ``[B]``, on the reader's device."""
        i = index.long().cpu().numpy()
        e = epoch.long().cpu().numpy() if self.random_views else np.zeros_like(i)  # every epoch sees one view
        if len(i) and (i.min() < 0 or i.max() >= self.num_samples or e.min() < 0 or e.max() >= self.epochs):
            raise IndexError(
                f"teacher cache lookup of epochs {e.min()}..{e.max()}, samples {i.min()}..{i.max()}: it holds "
                f"{self.epochs} epoch(s) of {self.num_samples} samples"
            )
        shard = np.searchsorted(self._stops, i, side="right")
        values = np.empty((len(i), self.k), dtype=np.float32)
        indices = np.empty((len(i), self.k), dtype=np.int64)
        lse = np.empty(len(i), dtype=np.float32)
        for ep in np.unique(e):
            maps = self.mapped(int(ep))
            in_epoch = e == ep
            for s in np.unique(shard[in_epoch]):
                sel = np.flatnonzero(in_epoch & (shard == s))
                rows = i[sel] - self._starts[s]  # fancy indexing reads just these rows' pages
                values[sel], indices[sel], lse[sel] = (maps[s][name][rows] for name in ARRAYS)
        d = self.device
        return torch.from_numpy(values).to(d), torch.from_numpy(indices).to(d), torch.from_numpy(lse).to(d)

    def logits(self, epoch: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The teacher's full logits ``[B, N]`` (only when every class is stored)."""
        values, indices, _ = self.lookup(epoch, index)
        return torch.empty(values.shape[0], self.num_classes, device=values.device).scatter_(1, indices, values)
