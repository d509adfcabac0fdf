"""Low-rank factorisation (``lowrank`` recipe method): SVD of linear layers, channel SVD or Tucker-2 of convolutions."""

from slimforge.compress.lowrank import svd  # noqa: F401  registers lowrank
