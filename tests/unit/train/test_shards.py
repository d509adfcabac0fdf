"""Tar shards (``data.source: webdataset``) and file-backed splits (``disk``, ``parquet``): the stream's sharding
across ranks and workers, its seeded order, its views against the indexed path's, resume, and bad shards."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import datasets
import pytest
import torch

from slimforge.train.data import ImageSamples, build_loader, load_splits
from slimforge.train.errors import DataError
from slimforge.train.streaming import ShardStream
from tests.conftest import ROOT, mnist_rows, mnist_shards, run_cmd, tiny_data_config, write_tar_shards

N_TRAIN, N_VAL = 256, 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """8 training shards of 32 MNIST digits, 2 validation shards, a classes.txt."""
    return mnist_shards(tmp_path_factory.mktemp("shards"), N_TRAIN, N_VAL, per_shard=32)


def wds_config(shards: dict, **overrides):
    base = dict(source="webdataset", shards=shards, max_train_samples=None, max_val_samples=None, batch_size=16)
    return tiny_data_config(**(base | overrides))


def rank_indices(ds, cfg, rank: int, ranks: int, epoch: int, workers: int, seed: int = 0, skip: int = 0):
    """The batches of ``index`` one rank's stream yields at ``epoch`` (``workers`` real worker processes)."""
    stream = ShardStream(ds, cfg, seed, cfg.batch_size, rank, ranks)
    stream.set_epoch(epoch)
    stream.resume_at(skip)
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, num_workers=workers)
    return [b["index"].tolist() for b in loader]


def test_shards_load_as_indexed_splits_with_a_cached_index(shards):
    cfg = wds_config(shards)
    splits = load_splits(cfg)
    rows = mnist_rows(N_TRAIN + N_VAL)
    assert (len(splits.train), len(splits.val), splits.class_names) == (N_TRAIN, N_VAL, [str(i) for i in range(10)])
    assert isinstance(splits.train.features["label"], datasets.ClassLabel)
    assert splits.train.with_format(None)["label"][:] == rows["label"][:N_TRAIN]
    assert splits.val.with_format(None)["label"][:] == rows["label"][N_TRAIN:]
    assert splits.train[5]["image"].convert("L").tobytes() == rows[5]["image"].tobytes()
    folder = Path(shards["train"]).parent
    assert len(list(folder.glob(".slimforge-index-*.npz"))) == 2  # one per split, beside the shards
    again = load_splits(cfg)  # from the cached index
    assert again.val.with_format(None)["offset"][:] == splits.val.with_format(None)["offset"][:]


@pytest.mark.parametrize("per_shard, ranks, workers", [(32, 2, 2), (128, 2, 2)], ids=["8-shards", "2-shards"])
def test_ranks_and_workers_read_disjoint_samples_whose_union_is_the_epoch(tmp_path, per_shard, ranks, workers):
    """8 shards over 2 ranks x 2 workers: each reader its own shards; 2 shards for 4 readers: the documented
    fallback (every reader reads every shard and keeps every 4th sample)."""
    cfg = wds_config(mnist_shards(tmp_path, N_TRAIN, N_VAL, per_shard))
    train = load_splits(cfg).train
    seen = [rank_indices(train, cfg, r, ranks, epoch=1, workers=workers) for r in range(ranks)]
    assert [len(b) for b in seen] == [N_TRAIN // (ranks * 16)] * ranks  # the same number of steps on every rank
    flat = [set(i for b in batches for i in b) for batches in seen]
    assert sum(len(s) for s in flat) == N_TRAIN and set().union(*flat) == set(range(N_TRAIN))
    if per_shard == 32:  # whole shards per rank: 4 of the 8 each
        assert all(len({i // per_shard for i in s}) == 4 for s in flat)


def test_every_rank_runs_the_same_steps_over_uneven_shards(tmp_path):
    """7 shards of 32 and one of 5: 229 samples, 2 ranks of 16 → 7 steps each (229 // 32); the short reader wraps."""
    rows = [(r["image"], r["label"]) for r in mnist_rows(229)]
    write_tar_shards(tmp_path, "train", rows, 32)
    write_tar_shards(tmp_path, "val", rows[:8], 8)
    (tmp_path / "classes.txt").write_text("\n".join(str(i) for i in range(10)))
    cfg = wds_config({"train": str(tmp_path / "train-*.tar"), "validation": str(tmp_path / "val-*.tar")})
    train = load_splits(cfg).train
    for epoch in (0, 1):
        seen = [rank_indices(train, cfg, r, 2, epoch, workers=0) for r in range(2)]
        assert [len(b) for b in seen] == [7, 7] and all(len(b) == 16 for batches in seen for b in batches)


def test_the_order_is_seeded_by_seed_and_epoch(shards):
    cfg = wds_config(shards, shuffle_buffer=50)
    train = load_splits(cfg).train
    order = rank_indices(train, cfg, 0, 1, epoch=0, workers=0)
    assert order == rank_indices(train, cfg, 0, 1, epoch=0, workers=0)
    assert order != rank_indices(train, cfg, 0, 1, epoch=1, workers=0)
    assert order != rank_indices(train, cfg, 0, 1, epoch=0, workers=0, seed=1)
    assert sorted(i for b in order for i in b) == list(range(N_TRAIN))
    assert [i for b in order for i in b] != list(range(N_TRAIN))


def test_a_resumed_epoch_yields_the_rest_of_the_uninterrupted_one(shards):
    cfg = wds_config(shards, shuffle_buffer=40)
    train = load_splits(cfg).train
    full = rank_indices(train, cfg, 1, 2, epoch=2, workers=2)
    assert rank_indices(train, cfg, 1, 2, epoch=2, workers=2, skip=3) == full[3:]


def test_stream_views_are_the_indexed_sources_views(shards, tmp_path):
    """Augmented (random-resized crop, RandAugment, erasing): a sample's view is (seed, epoch, index)'s, the same
    from the stream as from the same rows saved with save_to_disk."""
    views = dict(augment=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, translate=0.1)
    cfg = wds_config(shards, **views)
    rows = mnist_rows(N_TRAIN + N_VAL)
    datasets.DatasetDict(
        {"train": rows.select(range(N_TRAIN)), "validation": rows.select(range(N_TRAIN, 320))}
    ).save_to_disk(str(tmp_path / "saved"))
    disk = tiny_data_config(source="disk", path=str(tmp_path / "saved"), max_train_samples=None, **views)
    reference = ImageSamples(load_splits(disk).train, disk, is_training=True, seed=7)
    loader = build_loader(load_splits(cfg).train, cfg, is_training=True, seed=7)
    loader.dataset.set_epoch(3)
    batch = next(iter(loader))
    for k, index in enumerate(batch["index"].tolist()):
        expected = reference[(3, index)]
        assert (
            torch.equal(batch["pixel_values"][k], expected["pixel_values"]) and batch["label"][k] == expected["label"]
        )
    assert batch["epoch"].tolist() == [3] * 16


def bad_shards(tmp_path: Path, kind: str) -> dict:
    rows = [(r["image"], r["label"]) for r in mnist_rows(16)]
    write_tar_shards(tmp_path, "val", rows, 16)
    write_tar_shards(tmp_path, "train", rows, 8)
    (tmp_path / "classes.txt").write_text("\n".join(str(i) for i in range(10)))
    bad = tmp_path / "train-000001.tar"
    if kind == "class":
        with tarfile.open(bad, "a") as tar:
            info = tarfile.TarInfo("99999999.png")
            data = (tmp_path / "val-000000.tar").read_bytes()[512:1024]
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("99999999.cls")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"12"))
    elif kind == "empty":
        with tarfile.open(bad, "w"):
            pass
    pattern = "train-{000000..000002}.tar" if kind == "pattern" else "train-{000000..000001}.tar"
    return {"train": str(tmp_path / pattern), "validation": str(tmp_path / "val-000000.tar")}


@pytest.mark.parametrize(
    "kind, problem, fix",
    [
        ("class", "train-000001.tar: sample 99999999.cls has class 12, which is not in the class list", "classes.txt"),
        ("empty", "train-000001.tar holds no sample", "remove it from data.shards"),
        ("pattern", "data.shards.train: '", "brace range"),
    ],
    ids=["class-not-in-list", "empty-shard", "no-match"],
)
def test_bad_shards_stop_with_one_message_naming_the_shard(tmp_path, kind, problem, fix):
    with pytest.raises(DataError) as e:
        load_splits(wds_config(bad_shards(tmp_path, kind)))
    assert problem in e.value.problem and fix in e.value.fix
    if kind == "pattern":
        assert "train-000002.tar' matches no file" in e.value.problem


def test_a_bad_shard_ends_the_training_command_with_exit_2(tmp_path):
    spec = bad_shards(tmp_path / "data", "class")
    cmd = [sys.executable, "train/train.py", "--config", "configs/debug/tiny_train.yaml", "data.source=webdataset"]
    cmd += [f"data.shards={{train: '{spec['train']}', validation: '{spec['validation']}'}}"]
    proc = run_cmd([*cmd, f"train.output_dir={tmp_path / 'run'}"], cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: shard " in proc.stderr and "has class 12" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("source", ["disk", "parquet"])
def test_saved_sources_train(tmp_path, source):
    """(A webdataset source trains in tests/integration/test_webdataset.py.)"""
    from slimforge.train import train

    rows = mnist_rows(N_TRAIN + N_VAL)
    parts = {"train": rows.select(range(N_TRAIN)), "validation": rows.select(range(N_TRAIN, N_TRAIN + N_VAL))}
    if source == "disk":
        datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
        data = [f"data.path={tmp_path / 'saved'}"]
    else:
        for split, ds in parts.items():
            ds.to_parquet(str(tmp_path / "pq" / f"{split}-00000-of-00001.parquet"))
        data = [f"data.path={tmp_path / 'pq'}"]
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "configs/debug/tiny_train.yaml"), f"data.source={source}", *data]
    assert train.main([*args, "data.max_val_samples=null", "model.name=resnet10t", f"train.output_dir={out}"]) == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == N_TRAIN // 32 and 0.0 <= summary["val_acc"] <= 1.0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["val_acc"] for m in metrics if m["split"] == "val"] == [summary["val_acc"]]
