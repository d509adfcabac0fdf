"""Pruning: ``prune`` removes whole channels (structured); ``sparsity`` zeroes single weights (unstructured)."""

from slimforge.compress.prune import structured, unstructured  # noqa: F401  registers prune, sparsity
