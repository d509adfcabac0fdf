"""Representative subsets: what calibration, pruning importance, parity checks and the benchmark's accuracy read."""

from __future__ import annotations

import numpy as np


def stratified_indices(labels, n: int, seed: int = 0) -> list[int]:
    """A seeded, class-stratified sample of ``n`` row indices: the same on every rank and run with the same seed.

    Classes take turns, each in its own seeded random order, so every class is represented once ``n`` reaches
    the number of classes, the counts per class differ by at most one (where classes have enough rows), and every
    prefix of the result is itself stratified. Rows sorted by class (an image folder, an ImageNet validation split)
    make the first ``n`` rows one or two classes; this is what calibration, pruning importance, parity checks and
    the benchmark's accuracy read instead.

    Args:
        labels: ``[N]`` class index of every row (a list, an array or a ``datasets`` column).
        n: How many rows to take (all of them when ``n >= N``).
        seed: The sample's seed.

    Returns:
        Row indices, ``min(n, N)`` of them, in the order to read them.

    Example:
        >>> labels = [0, 0, 0, 1, 1, 1]
        >>> sorted(labels[i] for i in stratified_indices(labels, 4, seed=0))
        [0, 0, 1, 1]
    """
    labels = np.asarray(labels)
    n = min(n, len(labels))
    rng = np.random.default_rng(seed)
    _, inverse = np.unique(labels, return_inverse=True)
    # Rows grouped by class in one sort (not one scan per class: ImageNet has 1,000 classes over 1.28 M rows).
    groups = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    per_class = [rng.permutation(g) for g in groups]
    turns = rng.permutation(len(per_class))  # which class goes first in each round, seeded too
    out: list[int] = []
    depth = 0
    while len(out) < n:
        for c in turns:
            if depth < len(per_class[c]):
                out.append(int(per_class[c][depth]))
                if len(out) == n:
                    break
        depth += 1
    return out


def class_coverage(labels) -> str:
    """``"N images of K classes"``: what a report says about the sample it used."""
    labels = np.asarray(labels)
    return f"{len(labels)} images of {len(np.unique(labels))} classes"
