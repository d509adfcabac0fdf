"""``train/distill.py`` under Accelerate's FSDP path on CPU processes, for the tests (test_distributed.py).

Accelerate turns an FSDP launch into FSDP only on accelerators: on a CPU-only machine it silently becomes
``DistributedType.NO`` (the engine refuses that). The engine's FSDP code (FSDP2's sharded parameters and
gradients, mixed precision, resumable states, the gathered final weights) is the same on any device, and torch's
``fully_shard`` runs on CPU tensors over gloo. So this entry presents the launched gloo group to Accelerate as the
GPU one it expects (its backend choice and device placement are the only parts replaced) and then runs the real
entry. Launched as ``accelerate launch --config_file configs/accelerate/fsdp.yaml tests/integration/fsdp_on_cpu.py
--config ...``.
"""

from __future__ import annotations

import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType


def _gloo_as_gpu(self, cpu=False, sagemaker_dp=False, backend=None):
    return "gloo", DistributedType.MULTI_GPU


def _on_cpu(self):
    self.device = torch.device("cpu")


def main(argv: list[str]) -> int:
    PartialState._prepare_backend = _gloo_as_gpu
    PartialState.set_device = _on_cpu
    torch.distributed.init_process_group("gloo")  # Accelerate's GPU branch expects NCCL's group to exist
    from slimforge.train.distill import main as distill

    return distill(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
