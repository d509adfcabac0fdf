"""DeepSpeed trains what the run config says: bf16 under ZeRO-1/2/3 saves DeepSpeed's FP32 master weights, and an
offloading launch config steps the configured optimizer. Real `accelerate launch`, 2 CPU processes over gloo."""

from __future__ import annotations

import json

import pytest
import torch

from slimforge.train.checkpoint import load_checkpoint
from tests.integration.test_distributed import (  # noqa: F401 (fixture)
    distill_tiny,
    launch_equivalence_runs,
    relative_difference,
    tiny_teacher,
    weights,
)


@pytest.mark.slow
# ZeRO-1/2 (one optimizer implementation): tests/integration/test_qat_distributed.py saves from ZeRO-2's masters.
@pytest.mark.parametrize("launch_config", ["zero3.yaml"])
def test_zero_bf16_saves_deepspeeds_fp32_master_weights(tmp_path, tiny_teacher, launch_config):  # noqa: F811
    """Under DeepSpeed, bf16 is DeepSpeed's torch_autocast, as under DDP: FP32 weights (batch norm included),
    convolutions computed in bf16, and the saved student is exactly the FP32 masters DeepSpeed's own ``zero_to_fp32``
    reads from the state written at the last update."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = tmp_path / "run"
    proc = distill_tiny(
        launch_config,
        tiny_teacher,
        out,
        "model.name=tests.factories:tiny_bn_convnet",  # batch norm: FP32 running statistics next to the weights
        "data.batch_size=16",
        "train.mixed_precision=bf16",
        "train.checkpoint_every=6",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    topology = summary["topology"]
    assert topology["precision_mode"] == "DeepSpeed torch_autocast" and topology["weights"] == "float32"
    assert topology["optimizer"] == "AdamW" and summary["train_compute_dtype"] == "torch.bfloat16"
    assert "mixed precision bf16 (DeepSpeed torch_autocast; weights float32, master weights float32" in proc.stderr
    student = load_checkpoint(out / "checkpoint", allow_factory=True)[0]
    saved = student.state_dict()
    masters = get_fp32_state_dict_from_zero_checkpoint(str(out / "state" / "step_00000006"), tag="pytorch_model")
    masters = {n: masters[n] for n, _ in student.named_parameters()}  # buffers have no master copy
    for name, master in masters.items():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], master.float()), name
    flat = torch.cat([saved[k].flatten() for k in masters])
    rounded = (flat.to(torch.bfloat16).float() != flat).float().mean().item()
    assert rounded > 0.9, f"only {rounded:.0%} of the weights hold more than bf16 precision"
    assert summary["val_acc"] is not None and all(torch.isfinite(v).all() for v in saved.values())


@pytest.mark.slow
def test_an_offload_config_steps_the_configured_optimizer(tmp_path, tiny_teacher):  # noqa: F811
    """With the optimizer state offloaded, Accelerate would replace SGD with DeepSpeedCPUAdam; slimforge keeps SGD,
    says so at startup, and the run ends with the weights of the same SGD run on one process (at the same global
    batch)."""
    runs = {"single": ("single.yaml", 32), "offload": ("zero2_offload.yaml", 16)}
    launch_equivalence_runs(tmp_path, runs, f"teacher.checkpoint={tiny_teacher}", "teacher.allow_factory=true",
                            "optim.name=sgd")  # fmt: skip
    topology = {n: json.loads((tmp_path / n / "summary.json").read_text())["topology"] for n in runs}
    assert topology["single"]["optimizer"] == "SGD"
    assert topology["offload"]["optimizer"] == "SGD on the offloaded CPU state"
    assert "offload_optimizer" in topology["offload"]["sharding"]
    offload, single = (weights(tmp_path / n / "checkpoint") for n in ("offload", "single"))
    diff = relative_difference(offload, single)
    assert diff <= 1e-5, f"ZeRO-2 offload with SGD differs from one process with SGD by {diff:.2e} (relative)"
