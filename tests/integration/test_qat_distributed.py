"""Quantisation-aware training under the real launchers: `accelerate launch` with 2 CPU processes over gloo.

- Under DDP and DeepSpeed ZeRO-2 both ranks hold the same activation scales (every observer reduces each batch's
  range across ranks), and weights and scales equal a single-process run at the same global batch.
- ZeRO-3 is refused with one message before any output.
- A QAT run killed with SIGKILL after its observers froze resumes onto the uninterrupted losses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from slimforge.compress.quantize.fakequant import ActivationQuantizer
from slimforge.train.checkpoint import load_checkpoint
from tests.conftest import ROOT, launch_args
from tests.integration.test_distributed import (
    ENV,
    descendants,
    launch,
    relative_difference,
    tiny_teacher,  # noqa: F401  (fixture)
    train_losses,
)

QAT = "compress=[{method: qat, calibration_images: 64, freeze_observers_step: 4}]"


def scales_and_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = load_checkpoint(path)[0]
    quantizers = {n for n, m in model.named_modules() if isinstance(m, ActivationQuantizer)}
    state = model.state_dict()
    scales = {k: v.float() for k, v in state.items() if k.rsplit(".", 1)[0] in quantizers}
    weights = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in quantizers}
    return scales, weights


@pytest.mark.slow
def test_qat_under_ddp_and_zero2_matches_a_single_process_run(tmp_path, tiny_teacher):  # noqa: F811
    config = "configs/debug/tiny_equivalence.yaml"
    runs = {"single": ("single.yaml", 32), "ddp": ("ddp.yaml", 16), "zero2": ("zero2.yaml", 16)}
    for name, (launch_config, batch) in runs.items():
        proc = launch(
            launch_config,
            "train/distill.py",
            config,
            f"teacher.checkpoint={tiny_teacher}",
            QAT,
            f"data.batch_size={batch}",
            "train.record_samples=true",
            f"train.output_dir={tmp_path / name}",
        )
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    ref_scales, ref_weights = scales_and_weights(tmp_path / "single" / "checkpoint")
    assert len(ref_scales) == 4 * 4  # input, 2 convs, pooling: min, max, scale and zero point of each
    for name in ("ddp", "zero2"):
        ranks = [json.loads((tmp_path / name / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
        # The digest covers the weights and every quantizer's range, scale and zero point: the same on both ranks.
        assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"], name
        scales, weights = scales_and_weights(tmp_path / name / "checkpoint")
        assert relative_difference(weights, ref_weights) <= 1e-5, name
        assert relative_difference(scales, ref_scales) <= 1e-5, name
        recipe = load_checkpoint(tmp_path / name / "checkpoint")[1].recipe
        assert [s["method"] for s in recipe] == ["qat"] and recipe[0]["record"]["stage"] == "converted"


def test_qat_under_zero3_is_refused_before_any_output(tmp_path, tiny_teacher):  # noqa: F811
    out = tmp_path / "zero3"
    proc = launch(
        "zero3.yaml",
        "train/distill.py",
        "configs/debug/tiny_equivalence.yaml",
        f"teacher.checkpoint={tiny_teacher}",
        "data.batch_size=16",
        QAT,
        f"train.output_dir={out}",
        timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("error: compress step 'qat' cannot run under") == 1
    assert "ZeRO-3" in proc.stderr and "fix: launch it with configs/accelerate/ddp.yaml" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_qat_killed_after_its_observers_froze_resumes_onto_the_uninterrupted_losses(tmp_path, tiny_teacher):  # noqa: F811
    config = "configs/debug/tiny_distill.yaml"
    overrides = [
        f"teacher.checkpoint={tiny_teacher}",
        "model.source=factory",
        "model.name=tests.factories:tiny_convnet",
        "data.image_size=16",
        "data.num_workers=1",
        "train.epochs=2",
        "train.log_every=1",
        "train.checkpoint_every=6",
        "train.tensorboard=false",
        "compress=[{method: qat, calibration_images: 64, freeze_observers_step: 3}]",
    ]
    reference = tmp_path / "reference"
    proc = launch("ddp.yaml", "train/distill.py", config, *overrides, f"train.output_dir={reference}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = tmp_path / "killed"
    args = launch_args("ddp.yaml", "train/distill.py", config, *overrides, f"train.output_dir={run}")
    env = dict(os.environ, **ENV, PYTHONUNBUFFERED="1")
    victim = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not (run / "state" / "step_00000006" / "slimforge_state.json").exists():  # observers froze at 3
        assert victim.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    for pid in descendants(victim.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    victim.wait()
    assert not (run / "checkpoint").exists(), "killed before the end"

    proc = launch("ddp.yaml", "train/distill.py", config, *overrides, f"train.output_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    resumed_from = summary["resumed_from_step"]
    assert resumed_from is not None and resumed_from >= 6
    expected, got = train_losses(reference), train_losses(run)
    after = [s for s in expected if s > resumed_from]
    assert len(after) >= 4
    for step in after:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), f"step {step}"
    ref_scales, ref_weights = scales_and_weights(reference / "checkpoint")
    scales, weights = scales_and_weights(run / "checkpoint")
    assert relative_difference(weights, ref_weights) < 1e-6 and relative_difference(scales, ref_scales) < 1e-6
