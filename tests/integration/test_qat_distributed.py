"""Quantisation-aware training under the real launchers: `accelerate launch` with 2 CPU processes over gloo.

- Under DDP and DeepSpeed ZeRO-2 both ranks hold the same activation scales (every observer reduces each batch's
  range across ranks), and weights (batch norm folded) and scales equal a single-process run at the same global
  batch.
- ZeRO-3 is refused with one message before any output.

(A QAT run killed with SIGKILL after its observers froze resumes onto the uninterrupted losses:
tests/integration/test_distributed.py::test_sigkilled_run_resumes_onto_the_uninterrupted_losses[qat].)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimforge.compress.quantize.fakequant import ActivationQuantizer
from slimforge.train.checkpoint import load_checkpoint
from tests.integration.test_distributed import (
    launch,
    launch_equivalence_runs,
    relative_difference,
    tiny_teacher,  # noqa: F401  (fixture)
)

QAT = "compress=[{method: qat, calibration_images: 64, freeze_observers_step: 4}]"
# Batch norm on running statistics from the first update (freeze_bn_step 0), so a per-rank half batch normalises as
# the whole batch does; convert then folds it into each convolution's weight, in place, after the last update.
BN_STUDENT = ("model.name=tests.factories:tiny_bn_convnet", QAT.replace("}]", ", freeze_bn_step: 0}]"))


def scales_and_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = load_checkpoint(path, allow_factory=True)[0]
    quantizers = {n for n, m in model.named_modules() if isinstance(m, ActivationQuantizer)}
    state = model.state_dict()
    scales = {k: v.float() for k, v in state.items() if k.rsplit(".", 1)[0] in quantizers}
    weights = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in quantizers}
    return scales, weights


@pytest.mark.slow
def test_qat_under_ddp_and_zero2_matches_a_single_process_run(tmp_path, tiny_teacher):  # noqa: F811
    runs = {"single": ("single.yaml", 32), "ddp": ("ddp.yaml", 16), "zero2": ("zero2.yaml", 16)}
    launch_equivalence_runs(
        tmp_path,
        runs,
        f"teacher.checkpoint={tiny_teacher}",
        "teacher.allow_factory=true",
        *BN_STUDENT,
        "train.record_samples=true",
    )
    ref_scales, ref_weights = scales_and_weights(tmp_path / "single" / "checkpoint")
    assert len(ref_scales) == 4 * 4  # input, 2 convs, pooling: min, max, scale and zero point of each
    for name in ("ddp", "zero2"):
        ranks = [json.loads((tmp_path / name / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
        # The digest covers the weights and every quantizer's range, scale and zero point: the same on both ranks.
        assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"], name
        scales, weights = scales_and_weights(tmp_path / name / "checkpoint")
        assert relative_difference(weights, ref_weights) <= 1e-5, name
        assert relative_difference(scales, ref_scales) <= 1e-5, name
        recipe = load_checkpoint(tmp_path / name / "checkpoint", allow_factory=True)[1].recipe
        assert [s["method"] for s in recipe] == ["qat"] and recipe[0]["record"]["stage"] == "converted"
    # The saved convolutions hold the folded batch norm (DeepSpeed's master copies predate the fold): the loaded
    # model computes what the single-process one does.
    images = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        reference = load_checkpoint(tmp_path / "single" / "checkpoint", allow_factory=True)[0].eval()(images)
        for name in ("ddp", "zero2"):
            got = load_checkpoint(tmp_path / name / "checkpoint", allow_factory=True)[0].eval()(images)
            assert torch.allclose(got, reference, rtol=1e-4, atol=1e-4), name


def test_qat_under_zero3_is_refused_before_any_output(tmp_path, tiny_teacher):  # noqa: F811
    out = tmp_path / "run"
    proc = launch(
        "zero3.yaml",
        "train/distill.py",
        "configs/debug/tiny_equivalence.yaml",
        f"teacher.checkpoint={tiny_teacher}",
        "teacher.allow_factory=true",
        "data.batch_size=16",
        QAT,
        f"train.output_dir={out}",
        timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("error: compress step 'qat' cannot run under") == 1, proc.stderr[-3000:]
    assert "ZeRO-3" in proc.stderr and "fix: launch it with configs/accelerate/ddp.yaml" in proc.stderr
    assert not out.exists()
