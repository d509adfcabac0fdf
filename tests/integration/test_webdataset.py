"""Distillation from WebDataset tar shards: a real 2-process DDP launch with 2 DataLoader workers per rank reads
disjoint shards whose union is every epoch; an interrupted run resumes onto the uninterrupted one's weights; the
cached teacher, looked up by the stream's (epoch, index), trains the live teacher's student."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from slimforge.train import cache_teacher
from tests.conftest import ROOT, distill_here, launch_args, mnist_shards, run_cmd
from tests.integration.test_distributed import relative_difference, tiny_teacher, weights  # noqa: F401

# The launched entries import tests.factories; a PYTHONPATH already set (a checkout's own path) is kept after it.
ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}

CONFIG = "configs/debug/tiny_equivalence.yaml"
N_TRAIN, N_VAL = 256, 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    return mnist_shards(tmp_path_factory.mktemp("wds"), N_TRAIN, N_VAL, per_shard=32)


def run_args(shards: dict, teacher: Path, out: Path, *extra: str) -> list[str]:
    """Distil the factory-built ``teacher`` from ``shards`` into ``out``: batches of 16, every training sample."""
    return [
        f"teacher.checkpoint={teacher}",
        "teacher.allow_factory=true",
        f"train.output_dir={out}",
        "data.source=webdataset",
        f"data.shards={{train: '{shards['train']}', validation: '{shards['validation']}'}}",
        "data.max_train_samples=null",
        "data.max_val_samples=null",
        "data.batch_size=16",
        "train.max_steps=null",
        *extra,
    ]


@pytest.mark.slow
def test_two_ranks_of_two_workers_train_on_disjoint_samples_covering_every_epoch(shards, tiny_teacher, tmp_path):  # noqa: F811
    out = tmp_path / "ddp"
    extra = ("data.num_workers=2", "train.epochs=2", "train.record_samples=true", "data.shuffle_buffer=64")
    proc = run_cmd(
        launch_args("ddp.yaml", "train/distill.py", CONFIG, *run_args(shards, tiny_teacher, out, *extra)), env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in (0, 1):
        a, b = (r["indices_per_epoch"][epoch] for r in ranks)
        assert len(a) == len(b) == N_TRAIN // 2, epoch  # 8 steps of 16 on each rank
        assert not set(a) & set(b) and set(a) | set(b) == set(range(N_TRAIN)), epoch
    assert ranks[0]["indices_per_epoch"][0] != ranks[0]["indices_per_epoch"][1]  # reshuffled per epoch
    assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"]  # the replicas stayed in sync
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["processes"] == 2
    assert "(64 images)" in proc.stderr  # the validation shards, complete, on both epochs


@pytest.mark.slow
def test_an_interrupted_stream_resumes_onto_the_uninterrupted_weights(shards, tiny_teacher, tmp_path):  # noqa: F811
    """Stopped after update 5 of 16 (an odd batch with 2 workers: the workers swap reader roles), then resumed."""
    common = ("data.num_workers=2", "data.shuffle_buffer=40", "data.augment=true", "train.checkpoint_every=5")
    assert distill_here(CONFIG, *run_args(shards, tiny_teacher, tmp_path / "full", *common)) == 0
    cut = run_args(shards, tiny_teacher, tmp_path / "cut", *common)
    assert distill_here(CONFIG, *cut, "train.max_steps=5") == 0
    shutil.rmtree(tmp_path / "cut" / "checkpoint")  # as if killed after its state of update 5
    (tmp_path / "cut" / "summary.json").unlink()
    assert distill_here(CONFIG, *cut, "train.resume=true") == 0
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 5 and summary["steps"] == 16
    assert relative_difference(weights(tmp_path / "cut" / "checkpoint"), weights(tmp_path / "full" / "checkpoint")) == 0


@pytest.mark.slow
def test_the_cached_teacher_trains_the_live_teachers_student_from_shards(shards, tiny_teacher, tmp_path):  # noqa: F811
    views = ("data.augment=true", "data.auto_augment=rand-m9-mstd0.5-inc1", "data.re_prob=0.25", "train.epochs=2")
    cache = ("train.teacher_placement=cached", f"cache.path={tmp_path / 'cache'}", "cache.dtype=fp32")
    made = cache_teacher.main(
        ["--config", str(ROOT / CONFIG), *run_args(shards, tiny_teacher, tmp_path / "c", *views, *cache)]
    )
    assert made == 0
    assert distill_here(CONFIG, *run_args(shards, tiny_teacher, tmp_path / "cached", *views, *cache)) == 0
    assert distill_here(CONFIG, *run_args(shards, tiny_teacher, tmp_path / "live", *views)) == 0
    diff = relative_difference(weights(tmp_path / "cached" / "checkpoint"), weights(tmp_path / "live" / "checkpoint"))
    assert diff <= 1e-5, f"cached vs live teacher from shards: student weights differ by {diff:.2e} (relative)"
