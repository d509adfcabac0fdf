"""Batch-norm running statistics pooled across ranks: the global batch's, by the rule every launcher uses."""

from __future__ import annotations

import torch
from torch import nn

from slimforge.train.engine.replicas import pooled_running_statistics, state_digest


def test_pooled_running_statistics_are_the_global_batchs():
    """Four 'ranks' start from the same running statistics and each updates them with its own batch (shifted
    means, different spreads); pooling their results gives what one batch norm updated with the whole batch has."""
    torch.manual_seed(0)
    start = nn.BatchNorm1d(3, momentum=0.3)
    start.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    start.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
    shards = [torch.randn(4096, 3) * (1 + r) + r for r in range(4)]
    ranks = []
    for shard in shards:
        bn = nn.BatchNorm1d(3, momentum=0.3).train()
        bn.load_state_dict(start.state_dict())
        bn(shard)
        ranks.append(bn)
    mean, var = pooled_running_statistics(
        torch.stack([b.running_mean.double() for b in ranks]),
        torch.stack([b.running_var.double() for b in ranks]),
        torch.full((3,), 0.3, dtype=torch.float64),
    )
    whole = nn.BatchNorm1d(3, momentum=0.3).train()
    whole.load_state_dict(start.state_dict())
    whole(torch.cat(shards))
    assert torch.allclose(mean.float(), whole.running_mean, rtol=1e-6, atol=1e-6)
    assert torch.allclose(var.float(), whole.running_var, rtol=1e-3)  # n/(n-1) corrections: 1/4096
    # Rank 0's statistics (what DDP's buffer broadcast keeps) are far from it.
    assert not torch.allclose(ranks[0].running_var, whole.running_var, rtol=0.1)


def test_the_replica_digest_covers_running_statistics():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    before = state_digest(model)
    model[1].running_var.add_(1e-3)
    assert state_digest(model) != before
