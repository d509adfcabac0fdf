#!/usr/bin/env bash
# sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 scripts/launch_slurm.sh configs/accelerate/ddp.yaml train/distill.py --config configs/distill/mnist_resnet18_to_resnet10t.yaml
#
# Runs one `accelerate launch` per node (ntasks-per-node=1); Accelerate starts one process per GPU on each node.
# The same entry and run config as on one machine; the launch config picks the strategy (ddp.yaml,
# zero1-3*.yaml, fsdp.yaml); this script only fills in the rendezvous from SLURM's environment:
#   --num_machines      = SLURM_NNODES
#   --num_processes     = nodes × GPUs per node (total processes)
#   --machine_rank      = SLURM_NODEID (0..nodes-1)
#   --main_process_ip   = the first node of the allocation (every node must reach it over TCP)
#   --main_process_port = MASTER_PORT (default 29500; must be free on that node)
# All nodes must see the repository, the .venv and train.output_dir on a shared filesystem (checkpoints
# and resume). Resubmitting the same job resumes from the newest complete state (train.checkpoint_every).
#SBATCH --job-name=slimforge
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: sbatch [slurm options] $0 LAUNCH_CONFIG ENTRY.py --config RUN.yaml [section.key=value ...]" >&2
  exit 2
fi
LAUNCH_CONFIG=$1; shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$GPUS_PER_NODE" -lt 1 ]; then
  echo "error: no GPU visible on $(hostname); set GPUS_PER_NODE or request --gpus-per-node" >&2
  exit 2
fi
MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
echo "[slurm] $SLURM_NNODES nodes × $GPUS_PER_NODE GPUs = $NUM_PROCESSES processes, rendezvous $MAIN_NODE:$MASTER_PORT"
# srun starts the launcher once per node; SLURM_NODEID is evaluated on each node, hence the single quotes.
srun --kill-on-bad-exit=1 bash -c '.venv/bin/accelerate launch --config_file "$0" \
  --num_machines "$1" --num_processes "$2" --machine_rank "$SLURM_NODEID" \
  --main_process_ip "$3" --main_process_port "$4" --rdzv_backend static --same_network "${@:5}"' \
  "$LAUNCH_CONFIG" "$SLURM_NNODES" "$NUM_PROCESSES" "$MAIN_NODE" "$MASTER_PORT" "$@"
