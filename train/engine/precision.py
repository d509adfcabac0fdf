"""Numerics that differ between strategies: what the student's weights and master weights are held in, the
optimizer that really steps them, and the FP32 weights saved at the end.

``train.mixed_precision`` means the same under every strategy where it can: an autocast, with FP32 weights, FP32
optimizer state and norms computed in FP32. Under DDP (and one process) that is Accelerate's autocast. Under
DeepSpeed, Accelerate's autocast is off and ``bf16`` would turn on DeepSpeed's bf16 mode, which casts the module's
parameters (not its buffers) to bf16: a batch norm then holds bf16 weights next to FP32 running statistics, which
its kernels refuse (``expected scalar type BFloat16 but found Float``), and DeepSpeed cannot keep a layer in FP32.
So ``bf16`` under DeepSpeed runs DeepSpeed's ``torch_autocast`` instead: FP32 weights, bf16 matmuls and
convolutions as under DDP (DeepSpeed then also reduces those layers' gradients in bf16).

``fp16`` (GPUs only) stays DeepSpeed's fp16 mode, whose loss scaler ZeRO needs: 16-bit weights with FP32 masters
inside the ZeRO optimizer. There the student's inputs are cast to its weights' dtype and its outputs back to FP32
(losses in FP32), its buffers are held in fp16 too, and the frozen teacher keeps its own precision.

Under FSDP, Accelerate would cast every parameter to the low dtype, batch norms included: FSDP holds FP32 instead
and the same autocast as under DDP does the low-precision compute (:func:`fsdp_autocast`).

Under DeepSpeed the final student is assembled from the FP32 masters (``deepspeed.utils.safe_get_full_fp32_param``),
never from a 16-bit module, which would round every weight.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from slimforge.train.engine.topology import deepspeed_plugin
from slimforge.train.errors import SlimforgeError

logger = logging.getLogger(__name__)


def weights_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the module's weights are held in: a 16-bit one if any parameter has it (layers kept in FP32
    aside), else FP32."""
    dtypes = {p.dtype for p in module.parameters()}
    return next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), torch.float32)


def offloads_optimizer(accelerator) -> bool:
    """Whether the DeepSpeed launch config offloads the optimizer state to CPU (or NVMe)."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return False
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def keep_configured_optimizer(accelerator) -> None:
    """Makes an offloading DeepSpeed launch step the optimizer the run config built.

    With the optimizer offloaded, Accelerate replaces any torch optimizer with ``DeepSpeedCPUAdam`` built from the
    learning rate and weight decay alone (SGD with momentum would silently become Adam, AdamW's betas and eps would
    be dropped). ``zero_force_ds_cpu_optimizer: false`` keeps the configured optimizer; DeepSpeed then steps it on
    the offloaded FP32 partitions. A launch config that sets ``zero_force_ds_cpu_optimizer: true`` itself is
    refused, since the run would not train what the run config says.
    """
    plugin = deepspeed_plugin(accelerator)
    if not offloads_optimizer(accelerator):
        return
    if plugin.deepspeed_config.get("zero_force_ds_cpu_optimizer") is True:
        raise SlimforgeError(
            "the DeepSpeed launch config sets zero_force_ds_cpu_optimizer: true, which replaces the configured "
            "optimizer (optim.name) with DeepSpeedCPUAdam keeping only its learning rate and weight decay",
            "remove zero_force_ds_cpu_optimizer from the launch config (the run config's optimizer then steps the "
            "offloaded state)",
        )
    plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] = False


def deepspeed_autocast(accelerator) -> None:
    """Under DeepSpeed with ``train.mixed_precision=bf16``: DeepSpeed's ``torch_autocast`` instead of its bf16 mode
    (see the module's docstring). Accelerate then reports ``mixed_precision`` as ``no``."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None or str(accelerator.mixed_precision) != "bf16":
        return
    plugin.deepspeed_config["bf16"] = {"enabled": False}
    plugin.deepspeed_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}


def fsdp_autocast(accelerator) -> None:
    """Under FSDP with ``train.mixed_precision``: FP32 parameters with Accelerate's autocast, as under DDP.

    Accelerate's FSDP mixed precision casts every parameter to the low dtype (FSDP2's ``MixedPrecisionPolicy``
    ``param_dtype``), batch norms included, while their running statistics stay FP32: the batch norm kernel then
    refuses the mix (``expected scalar type BFloat16 but found Float``; FSDP1 kept batch norms out of it by default,
    FSDP2 has no such rule). With the policy's dtypes left unset, FSDP holds, gathers and reduces FP32 and the
    autocast Accelerate wraps around the forward computes convolutions and matmuls in the low dtype.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or str(accelerator.mixed_precision) == "no":
        return
    if getattr(plugin, "fsdp_version", 1) == 2:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy()
    else:
        from torch.distributed.fsdp import MixedPrecision

        plugin.mixed_precision_policy = MixedPrecision()


def buffers_in_weight_precision(accelerator, model: nn.Module) -> None:
    """Under DeepSpeed's fp16 mode: has DeepSpeed cast the floating buffers to fp16 too (``data_types.buffer_dtype``),
    so batch norms hold weights and running statistics in one dtype (the statistics then accumulate in fp16)."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None or str(accelerator.mixed_precision) != "fp16":
        return
    names = [n for n, b in model.named_buffers() if b.is_floating_point()]
    if names:
        data_types = plugin.deepspeed_config.setdefault("data_types", {})
        if data_types.get("buffer_dtype") not in (None, "fp16"):
            raise SlimforgeError(
                f"the DeepSpeed launch config holds buffers in {data_types['buffer_dtype']} while the weights are "
                f"in fp16: the student's normalisation layers ({names[0]} ...) cannot run that way",
                "remove data_types.buffer_dtype from the launch config",
            )
        data_types["buffer_dtype"] = "fp16"


def check_optimizer(prepared, configured: torch.optim.Optimizer) -> str:
    """The class of the optimizer that really steps the weights; raises if it is not the configured one."""
    inner = prepared
    while hasattr(inner, "optimizer") and not isinstance(inner, type(configured)):
        inner = inner.optimizer
    if type(inner) is not type(configured):  # under DeepSpeed: the torch optimizer its ZeRO optimizer steps
        raise SlimforgeError(
            f"the launcher replaced the configured optimizer {type(configured).__name__} with "
            f"{type(inner).__name__}: the run would not train what the run config says",
            "use a launch config from configs/accelerate/ unchanged, or set optim.name to the optimizer it runs",
        )
    return type(inner).__name__


def describe_numerics(
    accelerator, model: nn.Module, optimizer, configured: torch.optim.Optimizer, precision: str
) -> dict[str, Any]:
    """How the prepared student is computed, held and stepped: ``precision_mode``, ``weights``, ``master_weights``,
    ``optimizer``. ``precision`` is ``train.mixed_precision`` (under DeepSpeed's torch_autocast Accelerate reports
    ``no``).

    Raises:
        SlimforgeError: the optimizer that runs is not the configured one, or the weights are held in a
            precision the run config did not ask for.
    """
    weights = weights_dtype(accelerator.unwrap_model(model))
    deepspeed = deepspeed_plugin(accelerator) is not None
    expected = torch.float16 if deepspeed and precision == "fp16" else torch.float32
    mode = "none"
    if precision != "no":
        mode = "Accelerate autocast"
        if deepspeed:
            mode = "DeepSpeed fp16 (loss scaling)" if precision == "fp16" else "DeepSpeed torch_autocast"
    if weights != expected:
        raise SlimforgeError(
            f"the student's weights are held in {weights} but train.mixed_precision={precision} "
            f"under {accelerator.distributed_type} holds them in {expected}",
            "make the launch config's precision settings (mixed_precision, bf16/fp16 in a DeepSpeed config) agree "
            "with train.mixed_precision, or remove them from the launch config",
        )
    return {
        "precision_mode": mode,
        "weights": str(weights).replace("torch.", ""),
        "master_weights": "float32 (DeepSpeed's ZeRO optimizer)" if deepspeed else "float32 (the weights themselves)",
        "optimizer": check_optimizer(optimizer, configured)
        + (" on the offloaded CPU state" if offloads_optimizer(accelerator) else ""),
    }


def match_input_dtype(module: nn.Module) -> None:
    """Hooks ``module`` so floating inputs arrive in its weights' dtype and floating outputs leave in FP32.

    For a module DeepSpeed holds in fp16 (Accelerate's autocast is off then): the data loader's FP32
    images would not run through 16-bit convolutions, and losses of 16-bit logits would lose precision.
    Does nothing to an FP32 module.
    """
    dtype = weights_dtype(module)
    if dtype == torch.float32:
        return

    def cast(x, to):
        return x.to(to) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def inputs(_module, args, kwargs):
        return tuple(cast(a, dtype) for a in args), {k: cast(v, dtype) for k, v in kwargs.items()}

    def outputs(_module, _args, out):
        if isinstance(out, (tuple, list)):
            return type(out)(cast(o, torch.float32) for o in out)
        return cast(out, torch.float32)

    module.register_forward_pre_hook(inputs, with_kwargs=True)
    module.register_forward_hook(outputs)


def final_state_dict(accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The student's weights to save: every rank calls it (it gathers shards).

    Under DeepSpeed, each parameter is taken from DeepSpeed's FP32 master copy where the module holds that copy
    (frozen parameters, which have none, values a compression step's ``convert`` rewrote after the last update, and
    buffers come from the module, in FP32); otherwise ``accelerator.get_state_dict``.
    """
    state = accelerator.get_state_dict(model)
    if deepspeed_plugin(accelerator) is None:
        return state
    from deepspeed.utils import safe_get_full_fp32_param

    module = accelerator.unwrap_model(model)
    for name, param in module.named_parameters():
        master = safe_get_full_fp32_param(param)  # a collective: all-gathers the FP32 partitions
        if master is None or state is None or name not in state:
            continue
        saved = state[name]
        master = master.detach().cpu().reshape(saved.shape)
        # A compression step's convert (folding batch norm into a quantised convolution) rewrites a weight in place
        # after the last update, and DeepSpeed's master still holds the value before it: the master replaces only
        # a module value that is its copy (equal once rounded to the module's precision).
        if torch.equal(master.to(saved.dtype), saved.cpu()):
            state[name] = master
    if state is None:  # not the main process under ZeRO-3 (Accelerate returns the gathered dict on rank 0)
        return state
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
