"""Label-fraction subsets for the label-efficiency protocol.

Within one repeat the subsets are *nested* (the 10% subset lies inside the 25% one, and so on), so a curve
over fractions compares like with like; different repeats draw independent subsets. Each class keeps its
share of the training set (stratified), with at least one example per class.
"""
from __future__ import annotations

import numpy as np


def stratified_nested_subsets(labels, fractions, seed: int) -> dict[float, np.ndarray]:
    """Indices into `labels` for each fraction in (0, 1]; sorted indices, nested by fraction."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError("stratified subsets need one class label per example (use the first label column for multi-label)")
    classes, counts = np.unique(y, return_counts=True)
    fractions = sorted({float(f) for f in fractions}, reverse=True)
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"label fraction {f} is outside (0, 1]")
        if round(f * len(y)) < len(classes):
            raise ValueError(
                f"a {f:.0%} subset of {len(y)} examples leaves fewer examples ({round(f * len(y))}) "
                f"than classes ({len(classes)})"
            )
    rng = np.random.default_rng(seed)
    # One random order per class; a fraction takes a prefix of each, so smaller fractions are nested.
    orders = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
    out = {}
    for f in fractions:
        take = [orders[c][: max(1, int(round(f * n)))] for c, n in zip(classes, counts)]
        out[f] = np.sort(np.concatenate(take))
    return out
