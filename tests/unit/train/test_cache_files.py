"""The teacher cache's files (train/cache_files.py): narrow dtypes, a memory-mapped reader that returns what each
rank wrote, the size known before writing and a cache refused when it does not fit, is incomplete or of another
format version."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimforge.train import cache_files as cf
from slimforge.train.errors import SlimforgeError
from tests.conftest import ROOT


def reference(epochs: int, samples: int, classes: int, k: int, seed: int = 0):
    """Seeded teacher outputs ``values [E, N, k]`` (descending), ``indices [E, N, k]`` (distinct), ``lse [E, N]``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(epochs, samples, classes, generator=g) * 4
    values, indices = logits.topk(k, dim=2)
    return values, indices, torch.logsumexp(logits, dim=2)


def write(folder, values, indices, lse, classes: int, ranks: int, dtype: str = "fp32", batch: int = 7) -> dict:
    """Writes the cache as ``ranks`` caching ranks would, each its share in batches, and commits it."""
    epochs, samples, k = values.shape
    layout = cf.cache_layout(epochs, samples, classes, k, dtype, ranks)
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir()
    for rank, (start, stop) in enumerate(layout["shards"]):
        writer = cf.ShardWriter(partial, layout, rank)
        keys = [(e, i) for e in range(epochs) for i in range(start, stop)]
        for j in range(0, len(keys), batch):  # batches straddle the epochs' ends, as the loader's do
            e, i = (torch.tensor(c) for c in zip(*keys[j : j + batch]))
            writer.append(e, i, values[e, i], indices[e, i], lse[e, i])
        writer.close()
    return cf.commit_cache(partial, folder, layout)


def test_class_indices_take_the_narrowest_integer_type():
    assert [cf.index_dtype(n).name for n in (10, 256, 257, 1000, 32768, 32769)] == [
        "uint8", "uint8", "int16", "int16", "int16", "int32",
    ]  # fmt: skip


def test_the_reader_returns_what_each_rank_wrote(tmp_path):
    values, indices, lse = reference(epochs=3, samples=50, classes=300, k=5)
    meta = write(tmp_path / "cache", values, indices, lse, classes=300, ranks=3)
    assert meta["bytes"] == cf.cache_bytes(meta) and meta["shards"] == [[0, 16], [16, 33], [33, 50]]
    reader = cf.CacheReader(tmp_path / "cache")
    g = torch.Generator().manual_seed(1)
    for _ in range(4):  # random batches across ranks' shares and epochs, in any order
        e, i = torch.randint(0, 3, (17,), generator=g), torch.randint(0, 50, (17,), generator=g)
        v, ix, s = reader.lookup(e, i)
        assert torch.equal(v, values[e, i]) and torch.equal(ix, indices[e, i]) and torch.equal(s, lse[e, i])
        assert v.dtype == torch.float32 and ix.dtype == torch.int64
    every = reference(epochs=1, samples=4, classes=6, k=6)
    write(tmp_path / "all", *every, classes=6, ranks=2)
    full = torch.zeros(4, 6).scatter_(1, every[1][0], every[0][0])  # the teacher's logits
    assert torch.equal(cf.CacheReader(tmp_path / "all").logits(torch.zeros(4), torch.arange(4)), full)


def test_the_reader_maps_an_epochs_slice_not_the_whole_file(tmp_path):
    values, indices, lse = reference(epochs=4, samples=40, classes=10, k=3)
    write(tmp_path / "cache", values, indices, lse, classes=10, ranks=2, dtype="fp16")
    reader = cf.CacheReader(tmp_path / "cache")
    for epoch in range(4):
        reader.lookup(torch.full((5,), epoch), torch.arange(15, 20))
    assert list(reader._maps) == [2, 3] and cf.MAPPED_EPOCHS == 2  # older epochs unmapped
    shard = reader.mapped(3)[1]
    assert all(isinstance(m, np.memmap) for m in shard.values())
    assert shard["values"].dtype == np.float16 and shard["indices"].dtype == np.uint8
    assert shard["values"].shape == (20, 3) and shard["lse"].shape == (20,)  # one epoch of rank 1's 20 samples
    whole = np.load(tmp_path / "cache" / "rank_00001.values.npy")
    assert np.array_equal(shard["values"], whole[3]) and shard["values"].offset > whole[:3].nbytes


def test_a_logit_beyond_fp16_is_refused(tmp_path):
    layout = cf.cache_layout(1, 2, 10, 2, "fp16", 1)
    writer = cf.ShardWriter(tmp_path, layout, 0)
    with pytest.raises(SlimforgeError, match=r"not finite in cache.dtype fp16") as e:
        writer.append([0, 0], [0, 1], np.array([[7e4, 1.0], [2.0, 1.0]]), np.zeros((2, 2)), np.zeros(2))
    assert "cache.dtype=fp32" in e.value.fix


def test_the_free_space_check_names_both_figures():
    cf.check_free_space("anywhere", needed=10**9, free=10**9)
    with pytest.raises(SlimforgeError) as e:
        cf.check_free_space("/data/cache", needed=5_640_000_000, free=1_000_000_000)
    assert "needs 5.64 GB (5640000000 bytes) and /data/cache has 1.00 GB (1000000000 bytes) free" in e.value.problem
    assert "cache.epochs" in e.value.fix and "cache.topk" in e.value.fix and "cache.path" in e.value.fix


def test_an_impossible_cache_stops_the_caching_run_with_nothing_written(tmp_path, capsys, monkeypatch):
    """The caching entry itself (in this process), before any logit: the printed estimate, one message, exit 2,
    no folder."""
    from slimforge.train.cache_teacher import main

    monkeypatch.chdir(ROOT)
    cache = tmp_path / "sub" / "cache"
    rc = main(["--config", "configs/debug/tiny_distill.yaml", "teacher.checkpoint=unused", "cache.epochs=1000000000",
               f"cache.path={cache}", f"train.output_dir={tmp_path / 'run'}"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("error: ") == 1, err
    assert "the teacher cache needs 8704.00 GB (8704000000384 bytes) and" in err and "8704.000 GB" in out
    assert not (tmp_path / "sub").exists() and not (tmp_path / "run").exists()


def test_incomplete_and_old_caches_are_refused(tmp_path):
    (tmp_path / "partial").mkdir()
    with pytest.raises(SlimforgeError, match=r"is incomplete \(its writing did not finish\): no cache.json"):
        cf.CacheReader(tmp_path / "partial")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / cf.META).write_text(json.dumps({"format": "slimforge.teacher_cache", "version": 1}))
    with pytest.raises(SlimforgeError, match=r"has format version 1; this slimforge reads version 2") as e:
        cf.CacheReader(tmp_path / "old")
    assert "recompute it" in e.value.fix
    values, indices, lse = reference(epochs=1, samples=6, classes=10, k=2)
    write(tmp_path / "cut", values, indices, lse, classes=10, ranks=2)
    (tmp_path / "cut" / "rank_00001.lse.npy").unlink()
    with pytest.raises(SlimforgeError, match=r"lacks rank_00001.lse.npy"):
        cf.CacheReader(tmp_path / "cut")
