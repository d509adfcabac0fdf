"""Measures one benchmark row in a fresh process: ``python -m slimforge.export._worker JOB.json``.

The job file names the runtime, the artifact, a ``.npy`` of a few preprocessed images for the timing series, the
validation selection to stream through it for accuracy (dataset, ``max_images``, model description), the timing
settings and where to write the result (or, with ``"kind": "peaks"``, the arguments of the matmul peak
measurement). The result is :func:`slimforge.export.measure.measure_artifact`'s dict, or ``{"error", "fix"}``;
a process that dies without writing one (a segfault in a native runtime) is reported by the parent from its exit
status and stderr. Not a user entry point: :mod:`slimforge.export.benchmarking` starts it.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch


def validation_batches(job: dict[str, Any], batch_size: int) -> Callable[[], Iterator[torch.Tensor]]:
    """The accuracy pass's batches: the parent's validation selection (the same dataset, ``max_images`` and seed
    give the same images in the same order), preprocessed for the job's model, streamed."""
    from slimforge.export.evaldata import ValidationSet
    from slimforge.train.config import from_dict
    from slimforge.train.data import DataConfig
    from slimforge.train.models import ModelSpec

    val = ValidationSet(from_dict(DataConfig, job["data"]), job["max_images"])
    spec = ModelSpec.from_dict(job["spec"])
    return lambda: val.batches(spec, batch_size)


def main(argv: list[str] | None = None) -> int:
    from slimforge.export.measure import TimingConfig, measure_artifact
    from slimforge.export.report import write_json
    from slimforge.train.errors import SlimforgeError, first_line

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with open(argv[0]) as f:
        job = json.load(f)
    try:
        if job.get("kind") == "peaks":
            from slimforge.export.peak import measure_peaks

            write_json(job["result"], measure_peaks(**job["peaks"]))
            return 0
        images = np.load(job["images"])  # [n, C, H, W] timing images: in memory before the memory probe starts
        timing = TimingConfig(**job["timing"])
        batches = validation_batches(job["validation"], timing.eval_batch_size)
        result = measure_artifact(job["runtime"], job["artifact"], images, timing, job.get("allow_factory"), batches)
    except SlimforgeError as e:
        result = {"error": e.problem, "fix": e.fix}
    except Exception as e:  # report it as this row's error; the traceback goes to stderr for -v
        traceback.print_exc()
        result = {"error": first_line(e), "fix": ""}
    write_json(job["result"], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
