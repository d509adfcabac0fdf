"""The benchmark's accuracy counts the whole validation split by default, streamed through each row; ``--max-images
N`` is a seeded class-stratified sample, and the report says how many images and classes it used. On an image folder
sorted by class (100 classes, 6 validation images each), the first 500 rows would be 84 classes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from slimforge.export.benchmark import main as benchmark_main
from slimforge.export.benchmarking import BenchConfig, run_benchmark
from slimforge.export.measure import TimingConfig
from slimforge.train.checkpoint import load_checkpoint
from slimforge.train.data import load_splits, with_transform
from slimforge.train.sampling import stratified_indices

QUICK = ["--runs", "2", "--rounds", "1", "--min-round-s", "0", "--warmup", "0", "--throughput-runs", "1"]
QUICK += ["--batch-sizes", "1", "--threads", "1", "--peak-seconds", "0", "--no-progress", "--allow-factory"]


def _accuracy(checkpoint, val, data) -> float:
    """Top-1 accuracy of the checkpoint on ``val`` (a ``datasets`` split), computed here, independently."""
    model = load_checkpoint(checkpoint, allow_factory=True)[0]
    images = torch.stack(with_transform(val, data, is_training=False)[:]["pixel_values"])
    with torch.no_grad():
        preds = model(images).argmax(1).numpy()
    return float((preds == np.array(val["label"])).mean())


def test_max_images_500_covers_all_100_classes_with_5_images_each(folder_checkpoints, tmp_path, capsys):
    f = folder_checkpoints
    argv = ["--teacher", str(f.teacher), "--student", f"{f.student}@torch-eager", "--out", str(tmp_path)]
    assert benchmark_main([*argv, *QUICK, "--no-isolate", "--max-images", "500"]) == 0
    assert "500 validation images (100 classes; a seeded class-stratified sample" in capsys.readouterr().out
    report = json.loads((tmp_path / "benchmark.json").read_text())
    data = report["data"]
    assert (data["num_images"], data["num_classes"], data["sampled"]) == (500, 100, True)
    assert data["coverage"] == "500 images of 100 classes, sampled from 600"
    val = load_splits(f.data).val
    sample = val.select(stratified_indices(val["label"], 500, f.data.seed))
    assert np.bincount(sample["label"], minlength=100).tolist() == [5] * 100  # what the rows were scored on
    t_row, s_row = report["rows"]
    assert t_row["num_images"] == s_row["num_images"] == 500
    assert t_row["accuracy"] == _accuracy(f.teacher, sample, f.data)
    assert s_row["accuracy"] == _accuracy(f.student, sample, f.data)


def test_accuracy_counts_every_validation_image_by_default(folder_checkpoints):
    f = folder_checkpoints
    timing = TimingConfig(batch_sizes=[1, 4], runs=2, rounds=1, min_round_s=0, warmup=0, throughput_runs=1, threads=1)
    cfg = BenchConfig(timing=dataclasses.replace(timing, eval_batch_size=64), peak_seconds=0, progress=False)
    assert cfg.max_images is None  # the default
    cfg = dataclasses.replace(cfg, allow_factory=True, isolate=False)  # (test_benchmark.py runs the worker's stream)
    report = run_benchmark(f.teacher, [f"{f.student}@torch-eager"], cfg)
    data = report["data"]
    assert (data["num_images"], data["num_classes"], data["sampled"]) == (600, 100, False)
    val = load_splits(f.data).val
    t_row, s_row = report["rows"]  # each streamed 10 batches of 64 (the last one 24)
    assert [r["status"] for r in report["rows"]] == ["ok", "ok"] and t_row["num_images"] == s_row["num_images"] == 600
    assert t_row["accuracy"] == _accuracy(f.teacher, val, f.data)
    assert s_row["accuracy"] == _accuracy(f.student, val, f.data)
