#!/usr/bin/env bash
# sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 scripts/launch_slurm.sh configs/accelerate/ddp.yaml train/distill.py --config configs/distill/mnist_resnet18_to_resnet10t.yaml
#
# Runs one `accelerate launch` per node (ntasks-per-node=1); Accelerate starts one process per GPU on each node.
# The same entry and run config as on one machine; the launch config picks the strategy (ddp.yaml,
# zero1-3*.yaml, fsdp.yaml); this script fills in the rendezvous from SLURM's environment:
#   --num_machines      = SLURM_NNODES
#   --num_processes     = nodes × GPUs per node (total processes)
#   --machine_rank      = SLURM_NODEID (0..nodes-1)
#   --main_process_ip   = the first node of the allocation (every node must reach it over TCP)
#   --main_process_port = MASTER_PORT, else one derived from the job id (20000-29999), so two jobs sharing a
#                         first node do not collide on 29500
# Environment: SLIMFORGE_VENV (default: the repository's .venv, made absolute: srun's working directory and
# PATH on the other nodes are not the submitting shell's), GPUS_PER_NODE (default: nvidia-smi's count),
# MAX_RESTARTS (default 0: worker restarts inside one allocation, each resuming from the newest state).
# Restarts across allocations: submit with --requeue; a requeued job (or a resubmission) resumes from the newest
# complete state under train.output_dir (set train.checkpoint_every). All nodes must see the repository, the
# environment and train.output_dir on one shared filesystem. NCCL settings for InfiniBand: docs/distributed.md.
#SBATCH --job-name=slimforge
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=B:USR1@120
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: sbatch [slurm options] $0 LAUNCH_CONFIG ENTRY.py --config RUN.yaml [section.key=value ...]" >&2
  exit 2
fi
LAUNCH_CONFIG=$1; shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
VENV=$(realpath "${SLIMFORGE_VENV:-.venv}")
if [ ! -x "$VENV/bin/accelerate" ]; then
  echo "error: no accelerate in $VENV/bin: set SLIMFORGE_VENV to the environment slimforge is installed in" >&2
  exit 2
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$GPUS_PER_NODE" -lt 1 ]; then
  echo "error: no GPU visible on $(hostname); set GPUS_PER_NODE or request --gpus-per-node" >&2
  exit 2
fi
MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # reads all: no SIGPIPE under pipefail
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 10000))}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
MAX_RESTARTS=${MAX_RESTARTS:-0}
echo "[slurm] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes × $GPUS_PER_NODE GPUs" \
  "= $NUM_PROCESSES processes, rendezvous $MAIN_NODE:$MASTER_PORT, env $VENV"
# Before the time limit SLURM sends USR1 (--signal above): requeue the job so it resumes in a new allocation.
trap 'echo "[slurm] time limit near: requeueing ${SLURM_JOB_ID:-}"; scontrol requeue "${SLURM_JOB_ID:-}"' USR1
# With restarts the rendezvous is c10d (workers re-join after a failure); without, static (no extra store).
RDZV=(--rdzv_backend static)
if [ "$MAX_RESTARTS" -gt 0 ]; then
  RDZV=(--rdzv_backend c10d --max_restarts "$MAX_RESTARTS")
fi
# srun starts the launcher once per node; SLURM_NODEID is evaluated on each node, hence the single quotes.
srun --kill-on-bad-exit=1 bash -c '"$0/bin/accelerate" launch --config_file "$1" \
  --num_machines "$2" --num_processes "$3" --machine_rank "$SLURM_NODEID" \
  --main_process_ip "$4" --main_process_port "$5" --same_network "${@:6}"' \
  "$VENV" "$LAUNCH_CONFIG" "$SLURM_NNODES" "$NUM_PROCESSES" "$MAIN_NODE" "$MASTER_PORT" "${RDZV[@]}" "$@" &
wait $!
