"""Resumable-state checks that need no launch: the layouts a state may have, and the run fingerprint."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from slimforge.train.errors import SlimforgeError
from slimforge.train.schema import RunConfig
from slimforge.train.state import STATE_META, changed_fields, check_state, fingerprint

ACCELERATOR = SimpleNamespace(num_processes=1, distributed_type="DistributedType.FSDP")


def run_print(**train) -> dict:
    cfg = RunConfig()
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return fingerprint(cfg, ACCELERATOR)


def state(tmp_path, *files: str, fingerprint: dict | None = None):
    path = tmp_path / "step_00000004"
    for f in files:
        (path / f).parent.mkdir(parents=True, exist_ok=True)
        (path / f).write_bytes(b"x")
    meta = {"step": 4, "epoch": 0, "batch": 4, "world_size": 1, "distributed_type": "DistributedType.FSDP"}
    meta["fingerprint"] = fingerprint if fingerprint is not None else run_print()
    (path / STATE_META).write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize(
    "files",
    [
        ["optimizer.bin"],  # one process, DDP, FSDP full state dict
        ["pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt"],  # DeepSpeed ZeRO shards
        ["pytorch_model_fsdp_0/__0_0.distcp", "optimizer_0/__0_0.distcp"],  # FSDP sharded state dict
    ],
    ids=["accelerate", "deepspeed", "fsdp-sharded"],
)
def test_every_layout_accelerate_writes_is_resumable(tmp_path, files):
    path = state(tmp_path, "random_states_0.pkl", *files)
    assert check_state(path, ACCELERATOR, run_print())["step"] == 4


def test_a_state_without_optimizer_or_rng_is_refused(tmp_path):
    path = state(tmp_path, "pytorch_model_fsdp_0/__0_0.distcp")
    (path / "optimizer_0").mkdir()  # an empty sharded folder holds no state
    with pytest.raises(SlimforgeError, match="is missing random_states_0.pkl, optimizer state"):
        check_state(path, ACCELERATOR, run_print())


def test_fields_that_change_neither_numerics_nor_schedule_may_change(tmp_path):
    saved = run_print()
    assert changed_fields(saved, run_print(max_steps=100, log_every=3, output_dir="elsewhere", keep_states=5)) == []
    assert changed_fields(saved, run_print(epochs=11, seed=1)) == ["train.epochs: 10 -> 11", "train.seed: 42 -> 1"]
    path = state(tmp_path, "random_states_0.pkl", "optimizer.bin", fingerprint=saved)
    with pytest.raises(SlimforgeError, match="train.epochs: 10 -> 11"):
        check_state(path, ACCELERATOR, run_print(epochs=11))
