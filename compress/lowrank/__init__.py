"""Low-rank factorisation (``lowrank`` recipe method): SVD of linear layers and channel SVD of convolutions."""

from slimforge.compress.lowrank import svd  # noqa: F401  registers lowrank
