"""scripts/launch_slurm.sh under stand-ins for SLURM's commands: the `accelerate launch` line each node runs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.conftest import ROOT, run_cmd

SRUN = """#!/usr/bin/env bash
# srun stand-in: runs the per-node command once per node with that node's SLURM_NODEID.
shift  # --kill-on-bad-exit=1
for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@" || exit $?; done
"""
ACCELERATE = """#!/usr/bin/env bash
echo "accelerate $*"
"""


def stand_ins(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir, venv = tmp_path / "bin", tmp_path / "env with space"
    (venv / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    for path, text in (
        (bin_dir / "srun", SRUN),
        (bin_dir / "scontrol", "#!/usr/bin/env bash\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n"),
        (bin_dir / "nvidia-smi", "#!/usr/bin/env bash\nfor i in 0 1 2 3; do echo GPU $i: H100; done\n"),
        (venv / "bin" / "accelerate", ACCELERATE),
    ):
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_JOB_ID": "123456",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLIMFORGE_VENV": str(venv),
    }
    return env, venv


def test_each_node_gets_its_rank_and_the_derived_rendezvous(tmp_path):
    env, venv = stand_ins(tmp_path)
    args = ["bash", "scripts/launch_slurm.sh", "configs/accelerate/ddp.yaml", "train/distill.py", "--config", "x.yaml"]
    proc = run_cmd(args, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("accelerate ")]
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert line == (
            "accelerate launch --config_file configs/accelerate/ddp.yaml --num_machines 2 --num_processes 8 "
            f"--machine_rank {rank} --main_process_ip gpu-node-07 --main_process_port 23456 --same_network "
            "--rdzv_backend static train/distill.py --config x.yaml"
        )
    assert f"env {venv}" in proc.stdout and "8 processes" in proc.stdout

    restarts = run_cmd(args, env={**env, "MAX_RESTARTS": "3", "MASTER_PORT": "29999"})
    assert "--main_process_port 29999 --same_network --rdzv_backend c10d --max_restarts 3 train/distill.py" in (
        restarts.stdout
    )


def test_a_missing_environment_is_named(tmp_path):
    env, _ = stand_ins(tmp_path)
    proc = run_cmd(["bash", "scripts/launch_slurm.sh", "configs/accelerate/ddp.yaml", "train/distill.py"],
                   env={**env, "SLIMFORGE_VENV": str(tmp_path / "nowhere")})  # fmt: skip
    assert proc.returncode == 2 and "set SLIMFORGE_VENV" in proc.stderr
