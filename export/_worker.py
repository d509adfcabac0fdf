"""Measures one benchmark row in a fresh process: ``python -m slimforge.export._worker JOB.json``.

The job file names the runtime, the artifact, a ``.npy`` of preprocessed images, the timing settings and where
to write the result (or, with ``"kind": "peaks"``, the arguments of the matmul peak measurement). The result is
:func:`slimforge.export.measure.measure_artifact`'s dict, or ``{"error", "fix"}``;
a process that dies without writing one (a segfault in a native runtime) is reported by the parent from its exit
status and stderr. Not a user entry point: :mod:`slimforge.export.benchmarking` starts it.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback

import numpy as np


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
        images = np.load(job["images"])  # [N, C, H, W]: in memory before the memory probe starts
        timing = TimingConfig(**job["timing"])
        result = measure_artifact(job["runtime"], job["artifact"], images, timing, job.get("allow_factory", False))
    except SlimforgeError as e:
        result = {"error": e.problem, "fix": e.fix}
    except Exception as e:  # report it as this row's error; the traceback goes to stderr for -v
        traceback.print_exc()
        result = {"error": first_line(e), "fix": ""}
    write_json(job["result"], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
