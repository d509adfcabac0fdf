"""Distributed training for real: `accelerate launch` with 2 CPU processes over gloo.

- DDP, DeepSpeed ZeRO-2 and ZeRO-3 end with the weights of a single-process run at the same global batch.
- An FSDP launch on a machine without a GPU stops with a clear error instead of training unsynchronised.
- A run killed with SIGKILL after a checkpoint resumes, with the same command, onto the uninterrupted losses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from slimforge.train.checkpoint import load_checkpoint, save_checkpoint
from slimforge.train.data import describe
from slimforge.train.models import ModelConfig, build_model
from tests.conftest import ROOT, distill_here, free_port, launch_args, run_cmd, tiny_data_config

ENV = {"PYTHONPATH": str(ROOT)}  # the launched entries import tests.factories


def launch(config_file: str, entry: str, config: str, *overrides: str, timeout: int = 600):
    return run_cmd(launch_args(config_file, entry, config, *overrides), timeout=timeout, env=ENV)


def _tiny(teacher: Path, out: Path) -> tuple[str, ...]:
    """The overrides that distil from the factory-built ``teacher`` into ``out``."""
    return f"teacher.checkpoint={teacher}", "teacher.allow_factory=true", f"train.output_dir={out}"


def distill_tiny(launch_config: str, teacher: Path, out: Path, *overrides: str, timeout: int = 600):
    """``train/distill.py`` with ``configs/debug/tiny_equivalence.yaml``, from the factory-built ``teacher`` into
    ``out``."""
    return launch(
        launch_config, "train/distill.py", "configs/debug/tiny_equivalence.yaml", *_tiny(teacher, out), *overrides,
        timeout=timeout,
    )  # fmt: skip


def distill_tiny_here(teacher: Path, out: Path, *overrides: str) -> int:
    """:func:`distill_tiny` on one process, this one (:func:`tests.conftest.distill_here`): its exit code."""
    return distill_here("configs/debug/tiny_equivalence.yaml", *_tiny(teacher, out), *overrides)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    data = tiny_data_config(image_size=16)
    info = describe(data)
    torch.manual_seed(0)
    cfg = ModelConfig(source="factory", name="tests.factories:tiny_convnet", kwargs={"width": 16})
    model, spec = build_model(cfg, 10, info["input_size"], info)
    path = tmp_path_factory.mktemp("tiny_teacher") / "checkpoint"
    return save_checkpoint(model.state_dict(), spec, path, extra={"data": dataclasses.asdict(data)})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path, allow_factory=True)[0].state_dict()


def relative_difference(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in a) ** 0.5
    den = sum((a[k].double() ** 2).sum() for k in a) ** 0.5
    return float(num / den)


def test_deepspeed_is_installed():
    """The test command installs the deepspeed extra; without it the ZeRO checks below would not run."""
    import deepspeed  # noqa: F401


def launch_equivalence_runs(out: Path, runs: dict[str, tuple[str, int]], *overrides: str) -> None:
    """``configs/debug/tiny_equivalence.yaml`` once per ``{name: (launch config, per-process batch)}``, into
    ``out/<name>``; each must succeed. ``single.yaml`` runs (the references) run in this process."""
    for name, (launch_config, batch) in runs.items():
        args = (*overrides, f"data.batch_size={batch}", f"train.output_dir={out / name}")
        if launch_config == "single.yaml":
            assert distill_here("configs/debug/tiny_equivalence.yaml", *args) == 0, name
            continue
        proc = launch(launch_config, "train/distill.py", "configs/debug/tiny_equivalence.yaml", *args)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"


# Every equivalence run distils a structurally pruned student: the recipe's prune step runs on the bare model on
# each rank before accelerator.prepare (ranked by the Taylor importance of the distillation loss on the same
# calibration images everywhere), so DDP and DeepSpeed wrap a network whose channels are already gone. The
# student is wide enough (width 128) that its gradient norm exceeds 1, which the clipping test below relies on.
PRUNED_STUDENT = (
    "model.kwargs={width: 128}",
    "compress=[{method: prune, macs: 0.6, importance: taylor, calibration_images: 32}]",
    "train.log_every=1",
)
# Two ranks average two half-batch gradients where one process averages the whole batch: float32 sums in another
# order, which AdamW's division by sqrt(v) amplifies where v is small. Measured after the 6 updates: 3.7e-6 and
# 1.4e-5 (relative) for two students pruned from different calibration samples; the control below, the same run at
# half the global batch, lands 0.57 away.
EQUIVALENT = 5e-5
UNCLIPPED = {
    "single": ("single.yaml", 32),
    "ddp": ("ddp.yaml", 16),
    "zero2": ("zero2.yaml", 16),
    "zero3": ("zero3.yaml", 16),
    "single_b16": ("single.yaml", 16),
}


def unclipped_args(teacher: Path) -> tuple[str, ...]:
    """The overrides of every :data:`UNCLIPPED` run (each adds its batch size and output folder). A resumable state
    is written after update 3 of 6, from which the resume test continues the ZeRO runs."""
    return (
        f"teacher.checkpoint={teacher}",
        "teacher.allow_factory=true",
        "train.record_samples=true",
        "train.collective_timeout_s=321",
        "train.checkpoint_every=3",
        *PRUNED_STUDENT,
    )


@pytest.fixture(scope="module")
def unclipped_runs(tmp_path_factory, tiny_teacher) -> Path:
    """The pruned student distilled once per :data:`UNCLIPPED` launch, without gradient clipping."""
    out = tmp_path_factory.mktemp("unclipped")
    launch_equivalence_runs(out, UNCLIPPED, *unclipped_args(tiny_teacher))
    return out


@pytest.mark.slow
def test_ddp_zero2_zero3_match_a_single_process_run(unclipped_runs):
    runs = unclipped_runs
    summaries = {n: json.loads((runs / n / "summary.json").read_text()) for n in UNCLIPPED}
    for name in ("ddp", "zero2", "zero3"):
        ranks = [json.loads((runs / name / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
        # Each rank draws its own dropout masks, while the data shards stay disjoint and global ...
        assert ranks[0]["dropout_mask_sha256"] != ranks[1]["dropout_mask_sha256"], name
        assert not set(ranks[0]["indices_per_epoch"][0]) & set(ranks[1]["indices_per_epoch"][0]), name
        # ... and the process group waits as long as the run config says.
        assert [r["collective_timeout_s"] for r in summaries[name]["topology"]["ranks"]] == [321.0, 321.0], name
    assert summaries["ddp"]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert summaries["zero3"]["topology"]["sharding"] == "DeepSpeed ZeRO-3"
    assert all(s["steps"] == 6 and s["global_batch"] == 32 for n, s in summaries.items() if n != "single_b16")
    reference = weights(runs / "single" / "checkpoint")
    # Every rank pruned the same channels: the student that trained is the recorded, smaller one.
    assert reference["2.weight"].shape[0] < 256 and reference["6.weight"].shape[1] == reference["2.weight"].shape[0]
    for name in ("ddp", "zero2", "zero3"):
        got = weights(runs / name / "checkpoint")
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in reference.items()}, name
        diff = relative_difference(got, reference)
        assert diff <= EQUIVALENT, f"{name} differs from the single-process run by {diff:.2e} (relative)"
    # Control: the same single-process run at a different global batch lands measurably elsewhere, so the
    # tolerance above really tells synchronised from unsynchronised training.
    assert relative_difference(weights(runs / "single_b16" / "checkpoint"), reference) > 1e-3


def test_fsdp_on_a_cpu_only_machine_is_a_clear_error(tmp_path, tiny_teacher):
    if torch.cuda.is_available():
        pytest.skip("FSDP runs on GPUs here; this checks the CPU-only refusal")
    out = tmp_path / "fsdp"
    proc = launch(
        "fsdp.yaml",
        "train/distill.py",
        "configs/debug/tiny_equivalence.yaml",
        f"teacher.checkpoint={tiny_teacher}",
        "teacher.allow_factory=true",
        f"train.output_dir={out}",
        timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("error: the launch config asks for FSDP") == 1  # one message, from rank 0
    assert "without syncing gradients" in proc.stderr and "fix: " in proc.stderr
    assert not (out / "checkpoint").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_fsdp_trains_as_the_single_process_run_and_in_bf16(tmp_path, tiny_teacher, unclipped_runs):
    """FSDP2 through Accelerate, on CPU processes (tests/integration/fsdp_on_cpu.py): 2 ranks in FP32 train the
    single-process run's weights (sharded gradients synced, their global norm from the shards, the final weights
    gathered); 1 rank in bf16 trains a batch-norm student and saves it (batch norms under FSDP's mixed precision,
    the replica digest of sharded parameters)."""
    out = tmp_path / "fsdp"
    args = launch_args("fsdp.yaml", "tests/integration/fsdp_on_cpu.py", "configs/debug/tiny_equivalence.yaml",
                       *unclipped_args(tiny_teacher), "data.batch_size=16", f"train.output_dir={out}")  # fmt: skip
    proc = run_cmd(args, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed_type"] == "DistributedType.FSDP" and summary["steps"] == 6
    diff = relative_difference(weights(out / "checkpoint"), weights(unclipped_runs / "single" / "checkpoint"))
    assert diff <= EQUIVALENT, f"FSDP differs from the single-process run by {diff:.2e} (relative)"
    norms = [r["grad_norm"] for r in train_records(out)]
    single = [r["grad_norm"] for r in train_records(unclipped_runs / "single")]
    assert np.allclose(norms, single, rtol=1e-4), (norms, single)
    out = tmp_path / "fsdp_bf16"
    args = launch_args("fsdp.yaml", "tests/integration/fsdp_on_cpu.py", "configs/debug/tiny_equivalence.yaml",
                       *_tiny(tiny_teacher, out), "model.name=tests.factories:tiny_bn_convnet",
                       "train.mixed_precision=bf16")  # fmt: skip
    args[args.index("--config_file") + 2 : args.index("--config_file") + 2] = ["--num_processes", "1"]
    proc = run_cmd(args, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_compute_dtype"] == "torch.bfloat16" and (out / "checkpoint" / "model.safetensors").exists()


def descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (torch elastic starts each rank in a session of its own)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return found


def sigkill_once(args: list[str], state: Path) -> None:
    """Launches ``args`` and SIGKILLs the launcher, every rank and their DataLoader workers as soon as the
    resumable state ``state`` is complete: a crash mid-run."""
    env = dict(os.environ, **ENV, PYTHONUNBUFFERED="1")
    victim = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not (state / "slimforge_state.json").exists():
        assert victim.poll() is None, f"the run ended before {state.name}"
        assert time.time() < deadline
        time.sleep(0.05)
    for pid in descendants(victim.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    victim.wait()


def train_losses(run: Path) -> dict[int, float]:
    """The last logged rank-0 train loss per step (a resumed run logs the replayed steps again)."""
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train":
            losses[record["step"]] = record["loss"]
    return losses


# Sparsity masks grow every 3 updates (the state of update 4 holds the masks of update 3), then quantisation-aware
# training whose observers freeze at update 3.
SPARSE_QAT = (
    "compress=[{method: sparsity, sparsity: 0.5, every: 3},"
    " {method: qat, calibration_images: 64, freeze_observers_step: 3}]"
)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [[SPARSE_QAT]], ids=["sparsity+qat"])
def test_sigkilled_run_resumes_onto_the_uninterrupted_losses(tmp_path, tiny_teacher, recipe):
    """Killed after the state of update 4 (after a sparsity mask update, with QAT observers frozen at update 3),
    relaunched with the same command: the resumed updates give the uninterrupted run's losses, and its weights,
    zeros and scales. (A run without masks and observers is the subset the ZeRO resume tests below run.)"""
    config = "configs/debug/tiny_distill.yaml"
    overrides = [
        *recipe,
        f"teacher.checkpoint={tiny_teacher}",
        "teacher.allow_factory=true",
        "model.source=factory",
        "model.name=tests.factories:tiny_convnet",
        "data.image_size=16",
        "data.num_workers=1",
        "data.augment=true",
        "train.epochs=3",
        "train.log_every=1",
        "train.checkpoint_every=4",
        "train.tensorboard=false",
    ]
    reference = tmp_path / "reference"
    proc = launch("ddp.yaml", "train/distill.py", config, *overrides, f"train.output_dir={reference}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = tmp_path / "killed"
    args = launch_args("ddp.yaml", "train/distill.py", config, *overrides, f"train.output_dir={run}")
    sigkill_once(args, run / "state" / "step_00000004")
    assert not (run / "checkpoint").exists(), "killed before the end"
    killed_at = max(train_losses(run))

    proc = launch("ddp.yaml", "train/distill.py", config, *overrides, f"train.output_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    resumed_from = summary["resumed_from_step"]
    assert resumed_from is not None and resumed_from % 4 == 0 and resumed_from <= killed_at
    expected, got = train_losses(reference), train_losses(run)
    assert max(expected) == max(got) == summary["steps"]
    after = [s for s in expected if s > resumed_from]
    assert len(after) >= 8
    for step in after:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), f"step {step}"
    assert relative_difference(weights(run / "checkpoint"), weights(reference / "checkpoint")) < 1e-6
    if recipe:
        conv = weights(run / "checkpoint")["2.conv.weight"]  # the one pruned layer: stem and classifier stay dense
        assert torch.equal(conv == 0, weights(reference / "checkpoint")["2.conv.weight"] == 0)
        assert (conv == 0).float().mean() == pytest.approx(0.5, abs=1 / conv.numel())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_run_resumes_from_its_sharded_state(tmp_path, tiny_teacher, unclipped_runs, name):
    """A ZeRO run of the equivalence test (a pruned student) that died after the state of update 3 continues, from
    DeepSpeed's sharded model and optimizer files and every rank's RNG, onto the uninterrupted run's losses and
    final weights."""
    full, out = unclipped_runs / name, tmp_path / "run"
    assert any((full / "state" / "step_00000003").glob("pytorch_model*/*optim_states.pt")), "DeepSpeed's shards"
    # As if the run had died between the state of update 3 and the end: its outputs up to there.
    shutil.copytree(full, out, ignore=shutil.ignore_patterns("checkpoint", "summary.json", "step_00000006", "ranks"))
    logged = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(f"{r}\n" for r in logged if json.loads(r)["step"] <= 3))
    launch_equivalence_runs(tmp_path, {"run": UNCLIPPED[name]}, *unclipped_args(tiny_teacher))
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 3
    expected, got = train_losses(full), train_losses(out)
    assert sorted(got) == sorted(expected)  # updates 4..6 were logged by the resumed run
    for step in range(4, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), f"update {step}"
    assert relative_difference(weights(out / "checkpoint"), weights(full / "checkpoint")) < 1e-6


def test_missing_rng_state_on_resume_is_an_error(tmp_path, tiny_teacher, capsys):
    """A state folder without a rank's RNG file is refused, not resumed with a warning."""
    out = tmp_path / "run"
    args = ("train.checkpoint_every=2", "train.max_steps=4")
    assert distill_tiny_here(tiny_teacher, out, *args) == 0
    states = sorted((out / "state").iterdir())
    assert states, "no resumable state was written"
    (states[-1] / "random_states_0.pkl").unlink()
    (out / "checkpoint").rename(out / "old_checkpoint")  # as if the run had died before finishing
    capsys.readouterr()
    assert distill_tiny_here(tiny_teacher, out, *args) == 2
    err = capsys.readouterr().err
    assert "is missing random_states_0.pkl" in err and "fix: " in err


def launch_two_nodes(teacher: Path, outs: tuple[Path, Path]) -> list[subprocess.CompletedProcess]:
    """The README's two-node command, both "nodes" on this machine: one launcher per node, one process each,
    rendezvous on node 0's address; node ``i`` writes to ``outs[i]``."""
    port = str(free_port())
    overrides = [
        f"teacher.checkpoint={teacher}",
        "teacher.allow_factory=true",
        "model.source=factory",
        "model.name=tests.factories:tiny_convnet",
        "data.image_size=16",
        "train.epochs=1",
        "train.record_samples=true",
        "train.tensorboard=false",
    ]
    env = dict(os.environ, **ENV, PYTHONUNBUFFERED="1")
    nodes = []
    for node_rank, out in enumerate(outs):
        launcher = ("--num_machines", "2", "--num_processes", "2", "--machine_rank", str(node_rank))
        launcher += ("--main_process_ip", "127.0.0.1", "--main_process_port", port)
        args = launch_args(
            "multinode.yaml",
            "train/distill.py",
            "configs/debug/tiny_distill.yaml",
            *overrides,
            f"train.output_dir={out}",
            launcher=launcher,
        )
        nodes.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=600)[0].decode() for p in nodes]
    return [subprocess.CompletedProcess(p.args, p.returncode, text) for p, text in zip(nodes, outputs, strict=True)]


@pytest.mark.slow
def test_two_node_launch_with_the_multinode_template(tmp_path, tiny_teacher):
    """Two nodes sharing the output folder: the ranks are on different nodes (local rank 0 each) and stay in
    sync."""
    out = tmp_path / "run"
    logs = launch_two_nodes(tiny_teacher, (out, out))
    assert [p.returncode for p in logs] == [0, 0], logs[0].stdout[-3000:] + logs[1].stdout[-3000:]
    topology = json.loads((out / "summary.json").read_text())["topology"]
    assert topology["world_size"] == 2
    assert [(r["rank"], r["local_rank"]) for r in topology["ranks"]] == [(0, 0), (1, 0)]
    digests = {json.loads((out / "ranks" / f"rank{r}.json").read_text())["state_sha256"] for r in (0, 1)}
    assert len(digests) == 1


@pytest.mark.slow
def test_two_nodes_without_a_shared_output_folder_stop_with_one_message(tmp_path, tiny_teacher):
    """Each node writes to a folder the other cannot see (a node-local disk): every rank stops before training,
    and rank 0 names the rank and host that cannot see its folder."""
    outs = (tmp_path / "node0" / "run", tmp_path / "node1" / "run")
    logs = launch_two_nodes(tiny_teacher, outs)
    assert all(p.returncode != 0 for p in logs)
    text = logs[0].stdout
    assert text.count(f"error: train.output_dir {outs[0]} is not shared: rank 1 on ") == 1, text[-3000:]
    assert "fix: put train.output_dir on a filesystem every node mounts" in text
    assert not any((o / "checkpoint").exists() or (o / "metrics.jsonl").exists() for o in outs)


def train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


@pytest.mark.slow
def test_deepspeed_clips_exactly_as_the_run_config_says(tmp_path, tiny_teacher, unclipped_runs):
    """A student whose gradient norm exceeds 1: without optim.grad_clip, ZeRO-2/3 train as one process (and DDP)
    does (Accelerate would otherwise have DeepSpeed clip at 1.0; the unclipped runs are the equivalence test's);
    with optim.grad_clip=0.5 they clip exactly as one process does at the same global batch."""
    weights_of = {}
    for launch_config in ("single.yaml", "zero2.yaml", "zero3.yaml"):
        unclipped = unclipped_runs / launch_config.removesuffix(".yaml")
        assert json.loads((unclipped / "summary.json").read_text())["topology"]["grad_clip"] is None
        weights_of[launch_config, "null"] = weights(unclipped / "checkpoint")
        out = tmp_path / launch_config
        args = ("optim.grad_clip=0.5", *PRUNED_STUDENT)
        if launch_config == "single.yaml":  # the reference, at the same global batch (DDP equals it: above)
            assert distill_tiny_here(tiny_teacher, out, *args) == 0
        else:
            proc = distill_tiny(launch_config, tiny_teacher, out, "data.batch_size=16", *args)
            assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((out / "summary.json").read_text())["topology"]["grad_clip"] == 0.5
        weights_of[launch_config, "0.5"] = weights(out / "checkpoint")
    for run in ("single", "ddp"):
        norms = [r["grad_norm"] for r in train_records(unclipped_runs / run)]
        assert max(norms) > 1.0, (run, norms)  # the unclipped norm exceeds DeepSpeed's old default of 1.0
    for clip in ("null", "0.5"):
        for launch_config in ("zero2.yaml", "zero3.yaml"):
            diff = relative_difference(weights_of[launch_config, clip], weights_of["single.yaml", clip])
            assert diff <= EQUIVALENT, f"{launch_config}, optim.grad_clip={clip}: {diff:.2e} from one process"
    # Control: clipping at 0.5 really changed the training.
    assert relative_difference(weights_of["single.yaml", "0.5"], weights_of["single.yaml", "null"]) > 1e-3
