"""The cached teacher under a real 2-process DDP launch: the cache is written by each rank, distillation from it
trains exactly the student the live teacher trains (RandAugment, random erasing and Mixup/CutMix on), and a cache
that does not fit the run is refused by name."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimforge.train.checkpoint import save_checkpoint
from slimforge.train.config import load_config
from slimforge.train.data import describe
from slimforge.train.errors import SlimforgeError
from slimforge.train.models import ModelConfig, build_model
from slimforge.train.schema import RunConfig
from slimforge.train.teacher_cache import CachedTeacher
from tests.conftest import ROOT, launch_args, run_cmd, tiny_data_config
from tests.integration.test_distributed import ENV, relative_difference, tiny_teacher, weights  # noqa: F401

CONFIG = "configs/debug/tiny_equivalence.yaml"
# Random views every epoch: random-resized crop, RandAugment, random erasing, translation, Mixup and CutMix.
VIEWS = [
    "data.augment=true",
    "data.auto_augment=rand-m9-mstd0.5-inc1",
    "data.re_prob=0.25",
    "data.translate=0.1",
    "data.mixup_alpha=0.4",
    "data.cutmix_alpha=1.0",
    "train.epochs=2",
    "train.max_steps=null",
    "data.max_train_samples=256",
]


def args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return [f"teacher.checkpoint={teacher}", "teacher.allow_factory=true", f"train.output_dir={out}", *VIEWS, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_teacher):  # noqa: F811
    root = tmp_path_factory.mktemp("cache")
    cache = root / "cache"
    cached_args = ("train.teacher_placement=cached", f"cache.path={cache}", "cache.dtype=fp32")
    make = args(tiny_teacher, root / "c", *cached_args[1:], "cache.batch_size=32")
    procs = {
        "cache": run_cmd(launch_args("ddp.yaml", "train/cache_teacher.py", CONFIG, *make), env=ENV),
        "live": run_cmd(
            launch_args("ddp.yaml", "train/distill.py", CONFIG, *args(tiny_teacher, root / "live")), env=ENV
        ),
    }
    cached = args(tiny_teacher, root / "cached", *cached_args)
    procs["cached"] = run_cmd(launch_args("ddp.yaml", "train/distill.py", CONFIG, *cached), env=ENV)
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    return root, cache, tiny_teacher


def test_each_rank_wrote_its_shard_of_every_epoch(runs):
    _, cache, _ = runs
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["ranks"] == 2 and meta["epochs"] == 2 and meta["topk"] == meta["num_classes"] == 10
    shards = [load_file(str(p)) for p in sorted(cache.glob("shard_*.safetensors"))]
    assert len(shards) == 2
    seen = {(int(e), int(i)) for s in shards for e, i in zip(s["epoch"], s["index"])}
    assert seen == {(e, i) for e in range(2) for i in range(256)}
    assert meta["random_views"] and meta["view"]["data.auto_augment"] == "rand-m9-mstd0.5-inc1"


def test_distilling_from_the_cache_trains_the_live_teachers_student(runs):
    root, _, _ = runs
    live, cached = (json.loads((root / n / "summary.json").read_text()) for n in ("live", "cached"))
    assert live["steps"] == cached["steps"] > 0 and live["processes"] == cached["processes"] == 2
    diff = relative_difference(weights(root / "cached" / "checkpoint"), weights(root / "live" / "checkpoint"))
    print(f"cached vs live teacher, {live['steps']} updates: student weights differ by {diff:.2e} (relative)")
    assert diff <= 1e-5, f"cached vs live teacher: student weights differ by {diff:.2e} (relative)"
    assert cached["teacher_param_bytes_per_rank"] == [0, 0] and live["teacher_param_bytes_per_rank"][0] > 0
    assert cached["teacher_val_acc"] == pytest.approx(live["teacher_val_acc"])


@pytest.mark.parametrize(
    "change, needle",
    [
        (["data.re_prob=0.5"], "another view of the data: data.re_prob: 0.25 -> 0.5"),
        (["data.auto_augment=original"], "data.auto_augment: 'rand-m9-mstd0.5-inc1' -> 'original'"),
        (["train.epochs=3"], "it holds 2 augmented epoch(s) and this run trains 3"),
        (["train.seed=1"], "train.seed: 42 -> 1"),
        (["teacher.checkpoint=OTHER"], "it was made from teacher"),
    ],
    ids=["erasing", "policy", "epochs", "seed", "teacher"],
)
def test_a_cache_that_does_not_fit_the_run_is_refused(runs, tmp_path, change, needle):
    """The check a distillation run makes before training (in this process: the launched refusal and its exit
    status are the next test's)."""
    root, cache, teacher = runs
    if change == ["teacher.checkpoint=OTHER"]:  # the same architecture, other weights
        data = tiny_data_config(image_size=16)
        info = describe(data)
        torch.manual_seed(1)
        cfg = ModelConfig(source="factory", name="tests.factories:tiny_convnet", kwargs={"width": 16})
        model, spec = build_model(cfg, 10, info["input_size"], info)
        other = save_checkpoint(model.state_dict(), spec, tmp_path / "other", extra={"data": dataclasses.asdict(data)})
        change = [f"teacher.checkpoint={other}"]
    cfg = load_config(
        RunConfig, ROOT / CONFIG, args(teacher, tmp_path / "run", "train.teacher_placement=cached", *change)
    )
    with pytest.raises(SlimforgeError) as e:
        CachedTeacher(cache, cfg, num_classes=10, num_samples=256, device=torch.device("cpu"))
    assert needle in e.value.problem and "rebuild it for this run" in e.value.fix


def test_a_mismatched_cache_stops_the_launch_with_one_message(runs, tmp_path):
    _, cache, teacher = runs
    out = tmp_path / "run"
    cmd = [sys.executable, "train/distill.py", "--config", CONFIG,
           *args(teacher, out, "train.teacher_placement=cached", f"cache.path={cache}", "train.seed=7")]  # fmt: skip
    proc = run_cmd(cmd, env=ENV)
    assert proc.returncode == 2 and proc.stderr.count("error: ") == 1, proc.stderr[-2000:]
    assert "train.seed: 42 -> 7" in proc.stderr and not (out / "checkpoint").exists()


def test_a_top_k_above_the_class_count_is_refused(tiny_teacher, tmp_path):  # noqa: F811
    cmd = [sys.executable, "train/cache_teacher.py", "--config", CONFIG,
           *args(tiny_teacher, tmp_path / "c", "cache.topk=11", f"cache.path={tmp_path / 'cache'}")]  # fmt: skip
    proc = run_cmd(cmd, env=ENV)
    assert proc.returncode == 2 and "cache.topk: 11 is more than the dataset's 10 classes" in proc.stderr
    assert not (tmp_path / "cache").exists() and ROOT.exists()
