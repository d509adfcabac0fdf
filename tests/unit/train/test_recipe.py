"""The compress section: typed steps validated like every config section, and recorded steps rebuilt from a
checkpoint in a fresh process with the outputs of the model that was saved."""

from __future__ import annotations

import pytest
import torch

from slimforge.export.artifacts import ExportConfig, export_checkpoint
from slimforge.export.evaldata import ValidationSet
from slimforge.train.checkpoint import load_checkpoint
from slimforge.train.config import load_config
from slimforge.train.errors import ConfigError
from slimforge.train.recipe import build_methods, step_problems
from slimforge.train.schema import RunConfig
from tests.conftest import ROOT, compress_checkpoint, fresh_process_logits, tiny_data_config

MNIST = tiny_data_config()


@pytest.mark.parametrize(
    "step, needle",
    [
        ({"method": "qat", "freeze_observer_step": 5},
         "[0].freeze_observer_step: unknown key; did you mean 'freeze_observers_step'?"),
        ({"method": "qat", "activations": "int8"}, "[0].activations: int8 cannot be taken by backend ort-cpu"),
        ({"method": "qat", "backend": "tensorrt", "activations": "uint8"},
         "TensorRT quantises activations symmetrically"),
        ({"method": "qat", "calibration_images": 0}, "[0].calibration_images: 0 must be >= 1"),
        ({"method": "ptq", "calibrator": "kl"}, "[0].calibrator: 'kl' is not one of"),
        ({"method": "lowrank", "energy": 0.9, "rank_ratio": 0.5}, "set exactly one of them"),
        ({"method": "pruning"},
         "[0].method: unknown compression method 'pruning' (available: lowrank, prune, ptq, qat, sparsity)"),
        ({"method": "prune", "macs": 1.5}, "[0].macs: 1.5 must be in (0, 1), the share of MACs kept"),
    ],
    ids=["unknown-option", "activation-type", "tensorrt-activations", "no-calibration", "calibrator", "lowrank",
         "method", "prune-macs"],
)  # fmt: skip
def test_bad_steps_are_named_with_the_fix(step, needle):
    problems = step_problems([step])
    assert any(needle in p for p in problems), problems
    with pytest.raises(ConfigError) as e:
        build_methods([step])
    assert any(p.startswith("compress[0]") for p in e.value.problems)


def test_qat_refuses_the_launches_that_would_change_it():
    (qat,) = build_methods([{"method": "qat"}])
    assert qat.check_topology("DistributedType.DEEPSPEED", 2) is None
    assert qat.check_topology("DistributedType.MULTI_CPU", None) is None
    assert "ZeRO-3 / FSDP shard those weights" in qat.check_topology("DistributedType.DEEPSPEED", 3)
    assert "ZeRO-3 / FSDP shard those weights" in qat.check_topology("DistributedType.FSDP", None)
    fp16 = qat.check_topology("DistributedType.DEEPSPEED", 2, "float16")  # DeepSpeed's fp16 mode (GPUs)
    assert "scales, zero points and observed ranges in float16" in fp16


def test_run_config_names_every_bad_step_before_any_work():
    with pytest.raises(ConfigError) as e:
        load_config(
            RunConfig,
            ROOT / "configs/debug/tiny_train.yaml",
            ["compress=[{method: qat, freeze_bn_step: -1}, {method: lowrank, energy: 2}]"],
        )
    assert {p.split(":")[0] for p in e.value.problems} == {"compress[0].freeze_bn_step", "compress[1].energy"}


def test_a_two_stage_student_reloads_in_a_fresh_process_and_exports_through_both_gates(trained_resnet, tmp_path):
    """Stage 1 factorises the trained student and saves it; stage 2 loads that checkpoint (its recorded ranks
    rebuild the structure), adds QAT and saves again: the recipe is appended to, and a fresh process rebuilds
    exactly the model that was saved."""
    stage1, _ = compress_checkpoint(trained_resnet, tmp_path / "stage1", [{"method": "lowrank", "energy": 0.9}], 0)
    stage2, model = compress_checkpoint(stage1, tmp_path / "stage2", [{"method": "qat", "calibration_images": 64}], 3)
    images = ValidationSet(MNIST, 64).images_for(load_checkpoint(stage2)[1])
    with torch.no_grad():
        saved = model(images)
    logits, recipe = fresh_process_logits(stage2, images, tmp_path)
    assert recipe == ["lowrank", "qat"]
    assert torch.equal(logits, saved)
    report = export_checkpoint(stage2, tmp_path / "export", ExportConfig(formats=["onnx-qdq"], max_images=64))
    (entry,) = report["artifacts"]
    assert entry["passed"] and set(entry["checks"]) == {"emulated", "deployed"} and entry["int8_mac_fraction"] >= 0.95
