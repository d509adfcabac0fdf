"""Compression methods for a bare ``nn.Module`` (torch only at import time).

Importing the package registers every built-in recipe method, so a checkpoint's recipe can always be rebuilt.
"""

from slimforge.compress import lowrank, prune, quantize  # noqa: F401  registers lowrank, prune, qat, ptq
