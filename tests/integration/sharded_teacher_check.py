"""Launched by test_distill_ddp.py under `accelerate launch` (2 CPU processes): the sharded teacher placement on
architectures of several families gives the replicated teacher's logits and holds half the parameters per rank.
Prints one JSON line per model from rank 0."""

from __future__ import annotations

import copy
import json

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from train.memory import param_bytes
from train.placement import place_teacher
from train.task import freeze_

MODELS = {
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},  # parameters on the root (cls token, pos embed)
    "efficientnet_b0": {},
    "convnext_atto": {},
    "mobilenetv3_small_050": {},
}


def main() -> None:
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    for name, kwargs in MODELS.items():
        torch.manual_seed(0)
        model = freeze_(timm.create_model(name, num_classes=10, in_chans=1, **kwargs))
        reference, full = copy.deepcopy(model), param_bytes(model)
        sharded = place_teacher(model, "sharded", accelerator.device, accelerator.num_processes)
        torch.manual_seed(1 + accelerator.process_index)  # each rank its own images: the all-gathers must not mix
        images = torch.randn(4, 1, 32, 32)
        with torch.no_grad():
            diff = (sharded(images) - reference(images)).abs().max().item()
        if accelerator.is_main_process:
            print(json.dumps({"model": name, "max_abs_diff": diff, "held": param_bytes(sharded) / full}), flush=True)


if __name__ == "__main__":
    main()
