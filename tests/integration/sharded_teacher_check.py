"""Launched by test_distill_ddp.py under `accelerate launch` (2 CPU processes): the sharded teacher placement on
architectures of several families gives the replicated teacher's logits and holds half the parameters per rank.
Every rank checks its own logits and shard; rank 0 prints one JSON line per model and rank."""

from __future__ import annotations

import copy
import json

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object

from slimforge.train.memory import param_bytes
from slimforge.train.placement import place_teacher
from slimforge.train.task import freeze_

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
        mine = {"model": name, "rank": accelerator.process_index, "max_abs_diff": diff}
        mine["held"] = param_bytes(sharded) / full
        for result in gather_object([mine]):  # a collective: every rank's result reaches rank 0
            if accelerator.is_main_process:
                print(json.dumps(result), flush=True)
    # Tear the process group down before exit: gloo's threads still running at interpreter exit can abort the
    # process ("terminate called without an active exception", SIGABRT) after every result was printed.
    accelerator.end_training()


if __name__ == "__main__":
    main()
