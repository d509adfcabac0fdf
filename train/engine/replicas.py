"""Replica consistency: a digest of the trained weights, compared across ranks once per epoch."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from slimforge.train.engine.topology import deepspeed_plugin
from slimforge.train.errors import SlimforgeError


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def pooled_running_statistics(
    means: torch.Tensor, variances: torch.Tensor, momentum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch norm's running statistics of the global batch, from every rank's after one more local update.

    Each rank's update mixed its own batch's statistics (mean ``mu_r``, variance ``v_r``, equal sample counts) into
    the statistics they all shared: ``mean_r = (1 - m) mean + m mu_r``. The global batch's mean is the ranks' mean;
    its variance is the ranks' mean variance plus the spread of their means, ``mean((mu_r - mu)^2)``, which the
    spread of the updated running means carries times ``m^2``: so the pooled running variance is
    ``mean(var_r) + mean((mean_r - mean)^2) / m`` (the n/(n - 1) corrections of the per-rank and the global batch
    differ by less than 1/n, n being a rank's samples times pixels per channel).

    Args:
        means: ``[R, C]`` every rank's running means.
        variances: ``[R, C]`` every rank's running variances.
        momentum: ``[C]`` the update weight ``m`` of each channel's batch norm.

    Returns:
        ``([C], [C])`` the pooled running mean and variance.
    """
    mean = means.mean(0)
    return mean, variances.mean(0) + ((means - mean) ** 2).mean(0) / momentum


def pool_batch_norm_statistics_(model: nn.Module, accelerator) -> None:
    """Replaces every rank's batch-norm running statistics by those of the global batch, the same on every rank.

    Each rank normalises with its own micro-batch's statistics while training, and updates its running statistics
    with them: DeepSpeed and FSDP never synchronise buffers, and DDP broadcasts rank 0's alone before each forward.
    Evaluation, the saved student and a QAT fold (``freeze_bn_step``) read the running statistics, so they are
    pooled after every micro-batch (:func:`pooled_running_statistics`), by one rule under every launcher: one
    float64 all-reduce of three numbers per channel (kilobytes; a collective, every rank calls it).
    """
    import torch.distributed as dist

    bns = [m for m in _batch_norms(model) if m.training]
    if accelerator.num_processes == 1 or not bns:
        return
    means = torch.cat([m.running_mean.detach().double().view(-1) for m in bns])
    variances = torch.cat([m.running_var.detach().double().view(-1) for m in bns])
    sums = torch.stack([means, variances, means**2]).to(accelerator.device)
    dist.all_reduce(sums)
    world = accelerator.num_processes
    # mean((mean_r - mean)^2) = mean(mean_r^2) - mean^2: the all-reduce of the squares gives it in one collective.
    pooled = (sums / world).cpu()
    mean = pooled[0]
    spread = (pooled[2] - mean**2).clamp_min(0)
    momentum = torch.cat(
        [torch.full_like(m.running_mean, _momentum(m), dtype=torch.float64, device="cpu").view(-1) for m in bns]
    )
    variance = pooled[1] + spread / momentum
    at = 0
    for m in bns:
        n = m.running_mean.numel()
        m.running_mean.copy_(mean[at : at + n].view_as(m.running_mean))
        m.running_var.copy_(variance[at : at + n].view_as(m.running_var))
        at += n


def _momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The weight of the newest batch in ``bn``'s running statistics (a cumulative average without momentum)."""
    if bn.momentum is not None:
        return bn.momentum
    return 1.0 / max(int(bn.num_batches_tracked), 1)


def state_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter, every batch norm's running statistics and every activation quantizer's state
    (names and bytes): equal digests mean identical trained weights, normalisation and quantisation scales.

    The running statistics are the same on every rank because :func:`pool_batch_norm_statistics_` pools them after
    each micro-batch; the quantizers' ranges are because their observers reduce each batch's range across ranks.
    """
    from slimforge.compress.quantize.fakequant import ActivationQuantizer

    tensors = dict(model.named_parameters())
    for prefix, m in model.named_modules():
        if isinstance(m, ActivationQuantizer):
            tensors.update({f"{prefix}.{k}": v for k, v in m.named_buffers()})
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            tensors.update({f"{prefix}.running_mean": m.running_mean, f"{prefix}.running_var": m.running_var})
    from torch.distributed.tensor import DTensor

    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        if isinstance(t, DTensor):  # FSDP2 (digested with one process only, where the shard is the whole tensor)
            t = t.full_tensor()
        # A copy: a NumPy view would pin the parameter's storage, which FSDP frees and reallocates.
        h.update(t.detach().to("cpu", copy=True).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas_in_sync(model: nn.Module, accelerator) -> str:
    """Gathers every rank's state digest; raises if any rank's weights differ. Returns this rank's digest.

    This is a collective (all ranks must call it) and a CPU sync point; it runs once per epoch.
    """
    from accelerate.utils import DistributedType, gather_object

    plugin = deepspeed_plugin(accelerator)
    replicated = accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU) or (
        plugin is not None and plugin.zero_stage < 3  # ZeRO-1/2 shard optimizer state, not parameters
    )
    digest = state_digest(accelerator.unwrap_model(model)) if replicated or accelerator.num_processes == 1 else ""
    if replicated and accelerator.num_processes > 1:
        digests = gather_object([digest])
        if len(set(digests)) != 1:
            raise SlimforgeError(
                f"student replicas diverged across ranks (digests {[d[:8] for d in digests]}): gradients or batch-norm "
                "statistics are not being synchronised",
                "report this with the launch config; do not use these weights",
            )
    return digest
