"""Convergence: the earliest epoch at which a run reaches a fraction of its own best validation metric
(the paper's "HP-thresh", 98% by default), and the speed-up of one run over another."""
from __future__ import annotations

import numpy as np


def epochs_to_fraction_of_best(curve, fraction: float = 0.98) -> int:
    """1-based epoch at which `curve` (validation metric per epoch) first reaches `fraction` * its max."""
    values = np.asarray(curve, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).any():
        raise ValueError("the validation curve has no finite value")
    best = np.nanmax(values)
    reached = np.flatnonzero(np.nan_to_num(values, nan=-np.inf) >= fraction * best)
    return int(reached[0]) + 1


def speedup(epochs_pretrained: int, epochs_baseline: int) -> float:
    """How much earlier the pretrained run converged, as a fraction of the baseline's epochs
    (0.5 = in half the epochs; negative = later)."""
    return 1.0 - epochs_pretrained / epochs_baseline
