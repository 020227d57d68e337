"""Intensity normalisation of raw shard pixels to [0, 1], per modality.

Two methods, chosen per modality by `NormalizeConfig.method` (defaults: CT -> hu_window, MR/XR/US ->
robust_minmax). Both exist twice with the same float32 math: `normalize_numpy` (tests, preview, benchmark
chain) and `normalize_dali` (inside the DALI pipeline, CPU or GPU, with per-sample reductions).

hu_window (CT)
    out = clamp((x - lo) / (hi - lo), 0, 1) with (lo, hi) = (-1024, 3071) HU: the full 12-bit CT range,
    so air is 0, water ~0.25, dense bone / metal towards 1, and nothing a radiologist would look at is
    clipped. It expects Hounsfield units. `shards` applies the modality LUT (slope/intercept) whenever the
    result is exact in an integer dtype, which is the case for every CT we have met (slope 1, integer
    intercept); `python -m augment_dali.stats` counts reference CT slices whose LUT was NOT applied and
    warns, since their pixels are raw stored values.
robust_minmax (MR, XR, US)
    lo = min(x), hi = min(max(x), mean(x) + k * std(x)) with k = 4; out = clamp((x - lo) / (hi - lo), 0, 1).
    MR intensities have no physical unit and vary per scanner and series, so a per-image window is the
    only meaningful one. The moment-based upper bound stands in for the 99.5th percentile (DALI has no
    per-sample percentile; on the MPRAGE and GE MR slices of ../shared/data mean + 4 std lies between
    the 99.5th percentile and the maximum) and stops a few hot pixels from darkening the whole image. The
    method is invariant to any positive affine map of x, so it does not care whether a LUT was applied.
    A constant image (hi == lo) maps to all zeros: (x - lo) is 0 everywhere and the denominator is
    guarded by a tiny epsilon, so no division by zero and no NaN.
"""
from __future__ import annotations

import numpy as np

from .config import HU_WINDOW, ROBUST_MINMAX, NormalizeConfig

_EPS = 1e-6


def normalize_numpy(x: np.ndarray, method: str, config: NormalizeConfig = NormalizeConfig()) -> np.ndarray:
    """NumPy twin of `normalize_dali`: float32 image in [0, 1]."""
    x = np.asarray(x, dtype=np.float32)
    if method == HU_WINDOW:
        lo, hi = (np.float32(v) for v in config.hu_window)
    elif method == ROBUST_MINMAX:
        lo = x.min()
        mean = x.mean(dtype=np.float64)
        std = x.std(dtype=np.float64)
        hi = np.float32(min(float(x.max()), mean + config.robust_k * std))
    else:
        raise ValueError(f"unknown normalisation method {method!r}; use {HU_WINDOW!r} or {ROBUST_MINMAX!r}")
    den = np.float32(max(float(hi) - float(lo), _EPS))
    return np.clip((x - lo) / den, 0.0, 1.0).astype(np.float32)


def normalize_dali(x, method: str, config: NormalizeConfig = NormalizeConfig()):
    """DALI graph fragment: float32 DataNode (CPU or GPU, layout HW) -> normalised DataNode."""
    from nvidia.dali import fn, math

    if method == HU_WINDOW:
        lo, hi = config.hu_window
        return math.clamp((x - lo) * (1.0 / max(hi - lo, _EPS)), 0.0, 1.0)
    if method == ROBUST_MINMAX:
        lo = fn.reductions.min(x)
        mean = fn.reductions.mean(x)
        std = fn.reductions.std_dev(x, mean)
        hi = math.min(fn.reductions.max(x), mean + config.robust_k * std)
        return math.clamp((x - lo) / math.max(hi - lo, _EPS), 0.0, 1.0)
    raise ValueError(f"unknown normalisation method {method!r}; use {HU_WINDOW!r} or {ROBUST_MINMAX!r}")
