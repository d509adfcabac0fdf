"""Per-rank state memory accounting (the basis of the ZeRO memory figures)."""

from __future__ import annotations

import torch
from torch import nn

from slimforge.train.memory import state_memory


def test_counts_parameters_and_adam_state_once():
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = state_memory(model, opt)
    n = sum(p.numel() for p in model.parameters())
    assert before == {"param_bytes": 4 * n, "optimizer_bytes": 0}  # Adam state is created lazily
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    after = state_memory(model, opt)
    step_bytes = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert after["optimizer_bytes"] == 2 * 4 * n + step_bytes  # exp_avg + exp_avg_sq (+ step counters)


class Wrapper:
    """Like Accelerate's AcceleratedOptimizer / a ZeRO optimizer: holds the torch optimizer and FP32 partitions."""

    def __init__(self, optimizer, partitions):
        self.optimizer = optimizer
        self.single_partition_of_fp32_groups = partitions


def test_walks_wrappers_and_counts_zero_fp32_partitions():
    model = nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    partition = torch.zeros(36)
    got = state_memory(model, Wrapper(Wrapper(opt, [partition]), [partition]))  # shared storage counted once
    assert got["optimizer_bytes"] == 4 * 72 + 4 * 36
