"""Training on tar shards as a stream: each rank and each DataLoader worker reads its own shards, in order.

Random access into a shared file system is what tar shards avoid: :class:`ShardStream` reads whole shards
front to back (the ``webdataset`` package's tar reader), each shard by exactly one reader, and shuffles with a
buffer. What stays from the indexed sources is the sample index: every sample carries its position in the
training split (:mod:`slimforge.train.shards`), and its random view is :class:`~slimforge.train.views.ImageSamples`'
view of ``(seed, epoch, index)``, the same as the indexed path gives, so a cached teacher's ``(epoch, index)``
lookup holds.

Per epoch, as a pure function of ``(seed, epoch)``, the ranks and the workers per rank:

- **Shards**: the epoch's shard order is a seeded permutation; with ``R`` ranks of ``W`` workers, reader
  ``rank * W + worker`` takes every ``R * W``-th shard of it. With fewer shards than readers every reader reads
  every shard and keeps every ``R * W``-th sample (the fallback: correct, ``R * W`` times the reading).
- **Order**: each reader passes its samples through a shuffle buffer of ``data.shuffle_buffer`` samples seeded by
  ``(seed, epoch, reader)``.
- **Length**: every rank runs ``L = floor(N / (R * B))`` batches of ``B`` (DDP needs every rank to run as many
  steps); worker ``w`` makes ``L // W`` of them, plus one when ``w < L % W``. A reader whose shards hold more samples
  than that drops the rest of the epoch; one that holds fewer reads its shards again (a second pass, its own
  seeded order) and repeats samples.
- **Resume**: the DataLoader takes batches from its workers in turn, so batch ``j`` of a rank is read by reader
  role ``j % W``; :meth:`ShardStream.resume_at` gives each worker the role whose batch comes next and makes it pass
  over the samples of the batches already trained without decoding them: the rest of the epoch is the uninterrupted
  one, batch for batch, for the same ranks and workers.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slimforge.train.errors import DataError
from slimforge.train.shards import IMAGE_EXTENSIONS, ShardIndex, decode_image, rows_of
from slimforge.train.views import ImageSamples

if TYPE_CHECKING:
    from slimforge.train.data import DataConfig

logger = logging.getLogger(__name__)


class _Held:
    """The one decoded row :class:`ImageSamples` reads, set just before it is asked for it."""

    def __init__(self, n: int) -> None:
        self.n, self.row, self.index = n, None, -1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        assert index == self.index, (index, self.index)  # mixing partners are refused by DataConfig.validate
        return self.row


def world() -> tuple[int, int]:
    """``(rank, ranks)`` of this process under a launcher (torchrun's ``RANK`` / ``WORLD_SIZE``), else ``(0, 1)``."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class ShardStream(torch.utils.data.IterableDataset):
    """This rank's training samples of a shard split, as ``{"pixel_values", "label", "index", "epoch"}`` items
    (the indexed path's items). ``len`` is this rank's samples per epoch, a multiple of ``batch_size``.

    Args:
        ds: The training split of a ``webdataset`` source (rows of :func:`slimforge.train.shards.shard_splits`).
        cfg: The data config (transforms, ``shuffle_buffer``).
        seed: The training seed (shard order, shuffle buffers, views).
        batch_size: The per-rank batch.
        rank: This process's rank.
        ranks: The number of processes.

    Raises:
        DataError: the split has fewer samples than one batch per rank.
    """

    def __init__(self, ds, cfg: DataConfig, seed: int, batch_size: int, rank: int = 0, ranks: int = 1) -> None:
        from slimforge.train.data import INDEX_COLUMN

        index: ShardIndex = rows_of(ds).index
        self.paths, self.seed, self.batch, self.rank, self.ranks = index.paths, seed, batch_size, rank, ranks
        self.buffer = cfg.shuffle_buffer
        globals_ = np.asarray(ds.with_format(None)[INDEX_COLUMN], dtype=np.int64)
        # Position of every indexed sample in the split (-1: not in it, e.g. beyond data.max_train_samples).
        self.position = np.full(len(index.label), -1, dtype=np.int64)
        self.position[globals_] = np.arange(len(globals_))
        self.labels = index.label[globals_]  # [N] by position
        self.counts = index.counts()
        starts = np.concatenate([[0], np.cumsum(index.counts())])
        self.starts = starts[:-1]  # global index of every shard's first sample
        self.shards = [s for s in range(len(self.paths)) if (self.position[starts[s] : starts[s + 1]] >= 0).any()]
        self.batches = len(globals_) // (ranks * batch_size)  # per rank per epoch
        if self.batches == 0:
            raise DataError(
                f"the training shards hold {len(globals_)} samples, fewer than one batch of {batch_size} per rank "
                f"for {ranks} rank(s)",
                "lower data.batch_size or add shards",
            )
        self.samples = ImageSamples(_Held(len(globals_)), cfg, is_training=True, seed=seed)
        # Epoch and batches to pass over, read by every worker when it starts an epoch: shared memory, so that
        # persistent workers (which keep their copy of this object) see what set_epoch / resume_at wrote.
        self.state = torch.zeros(2, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self.batches * self.batch

    def set_epoch(self, epoch: int) -> None:
        if int(self.state[0]) != epoch:
            self.state[0], self.state[1] = epoch, 0

    def resume_at(self, batches: int) -> None:
        """Makes the current epoch start after its first ``batches`` batches (they are read, not decoded)."""
        self.state[1] = batches

    def plan(self, epoch: int, reader: int, readers: int) -> tuple[list[int], bool]:
        """The shards ``reader`` of ``readers`` reads at ``epoch``, and whether it keeps only every
        ``readers``-th sample of them (the fallback for fewer shards than readers)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.shards).tolist()
        if len(order) >= readers:
            return order[reader::readers], False
        return order, True

    def _read(self, epoch: int, reader: int, readers: int, pass_: int):
        """``(position, image bytes)`` of this reader's samples at ``epoch``, through its shuffle buffer."""
        from webdataset.tariterators import group_by_keys, tar_file_expander

        shards, strided = self.plan(epoch, reader, readers)
        rng = np.random.default_rng([self.seed, epoch, reader, pass_])
        buffer: list[tuple[int, bytes]] = []
        kept = 0
        for s in shards:
            start = int(self.starts[s])
            with open(self.paths[s], "rb") as f:
                found = -1
                for found, sample in enumerate(group_by_keys(tar_file_expander([{"url": self.paths[s], "stream": f}]))):
                    if found >= self.counts[s]:
                        break
                    position = int(self.position[start + found])
                    if position < 0:
                        continue
                    kept += 1
                    if strided and (kept - 1) % readers != reader:
                        continue
                    data = next(sample[k] for k in sample if k in IMAGE_EXTENSIONS)
                    if len(buffer) < self.buffer:
                        buffer.append((position, data))
                        continue
                    j = int(rng.integers(len(buffer)))
                    yield buffer[j]
                    buffer[j] = (position, data)
            if found + 1 != self.counts[s]:
                raise DataError(
                    f"shard {self.paths[s]} holds {found + 1} samples, its index {self.counts[s]}: it changed while "
                    "the run was reading it",
                    "keep the shards unchanged while training (a changed shard is indexed again at the next launch)",
                )
        for j in rng.permutation(len(buffer)).tolist():
            yield buffer[j]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        epoch, skip_batches = int(self.state[0]), int(self.state[1])
        # Batch j of an epoch is read by role j % workers. The DataLoader takes batches from its workers in turn
        # starting at worker 0, so after `skip_batches` worker w plays role (w + skip_batches) % workers, and
        # passes over that role's share of the skipped batches.
        role = (worker + skip_batches) % workers
        quota = (self.batches // workers + (role < self.batches % workers)) * self.batch
        skip = max(0, -(-(skip_batches - role) // workers)) * self.batch
        reader, readers = self.rank * workers + role, self.ranks * workers
        done, pass_ = 0, 0
        while done < quota:
            before = done
            for position, data in self._read(epoch, reader, readers, pass_):
                if done >= skip:
                    yield self._item(epoch, position, data)
                done += 1
                if done == quota:
                    return
            if done == before:
                raise DataError(
                    f"reader {reader} of {readers} (rank {self.rank}, worker {worker}) found no sample",
                    "use fewer data.num_workers or more shards",
                )
            pass_ += 1

    def _item(self, epoch: int, position: int, data: bytes) -> dict[str, Any]:
        held = self.samples.ds
        held.index, held.row = position, {"image": decode_image(data), "label": int(self.labels[position])}
        return self.samples[(epoch, position)]


def build_stream_loader(ds, cfg: DataConfig, seed: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The training DataLoader of a ``webdataset`` source for this process's rank: batches of ``cfg.batch_size``,
    already this rank's own (the engine moves them to the device without Accelerate's sharding)."""
    rank, ranks = world()
    stream = ShardStream(ds, cfg, seed, cfg.batch_size, rank, ranks)
    readers = ranks * max(cfg.num_workers, 1)
    if len(stream.shards) < readers:
        logger.warning(
            "%d training shards for %d readers (%d ranks x %d workers): every reader reads every shard and keeps "
            "every %d-th sample; write at least %d shards to read each once",
            len(stream.shards), readers, ranks, max(cfg.num_workers, 1), readers, readers,
        )  # fmt: skip
    return torch.utils.data.DataLoader(
        stream,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=pin_memory,
        persistent_workers=cfg.persistent_workers and cfg.num_workers > 0,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
    )
