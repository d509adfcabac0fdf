"""The training engine: the only part of slimforge that talks to Accelerate.

:func:`fit` (``loop.py``) runs one linear loop for supervised training and distillation under whatever topology
``accelerate launch`` set up; its parts live beside it: the Accelerator and its topology checks
(``topology.py``), one micro-step (``step.py``), evaluation (``evaluate.py``), the replica digest
(``replicas.py``), metrics and throughput (``metrics.py``) and the final save (``save.py``).
"""

from slimforge.train.engine.loop import fit

__all__ = ["fit"]
