"""scripts/gpu_check.sh: without a GPU it stops at once with its own exit status; on a GPU machine every item's
command is one this repository accepts (checked here without launching it)."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import pytest

from slimforge.train.config import load_config
from slimforge.train.schema import RunConfig
from tests.conftest import GPU_NODE, ROOT, run_cmd


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_stops_at_once_with_its_no_gpu_status(tmp_path):
    if GPU_NODE or shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA driver: the script would run its checks")
    start = time.perf_counter()
    proc = run_cmd(["bash", "scripts/gpu_check.sh", str(tmp_path / "x")], timeout=60)
    assert proc.returncode == gpu_check_module().NO_GPU == 3 and time.perf_counter() - start < 10
    assert "no NVIDIA GPU on this machine" in proc.stderr and not (tmp_path / "x").exists()
    # The Python driver refuses the same way where the shell check is bypassed.
    proc = run_cmd([str(Path(ROOT / ".venv/bin/python")), "scripts/gpu_check.py", "--out", str(tmp_path / "y")])
    assert proc.returncode == 3 and "no CUDA GPU is visible" in proc.stderr and not (tmp_path / "y").exists()
    assert run_cmd(["bash", "scripts/gpu_check.sh"]).returncode == 2


@pytest.mark.parametrize("gpus", [1, 2])
def test_every_training_item_is_a_valid_launch(tmp_path, gpus):
    items = dict(gpu_check_module().training_commands(tmp_path / "runs", gpus))
    assert list(items)[:1] == ["teacher"] and {"ddp_bf16", "ddp_fp16", "zero2_bf16", "zero3_bf16"} <= set(items)
    assert (items["sharded_teacher"] is None) == (gpus == 1)
    for name, cmd in items.items():
        if cmd is None:
            continue
        launch_config = ROOT / cmd[cmd.index("--config_file") + 1]
        entry = cmd[cmd.index("--config") - 1]
        run_config = cmd[cmd.index("--config") + 1]
        overrides = cmd[cmd.index("--config") + 2 :]
        assert launch_config.is_file() and (ROOT / entry).is_file(), name
        cfg = load_config(RunConfig, ROOT / run_config, overrides)  # raises on an unknown or invalid override
        assert cfg.train.output_dir == str(tmp_path / "runs" / name.removesuffix("_resume"))
