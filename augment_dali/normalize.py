"""Intensity normalisation of raw shard pixels to [0, 1], per modality and pixel units.

Which method applies depends on the modality and on the pixel units recorded at ingest
(shards.SampleMeta.units, `NormalizeConfig.method_for`): the HU window only for Hounsfield units
("HU": CT with an exact modality LUT); every "raw" image (MR, XR, US, and non-DICOM sources such as
8-bit MedMNIST or PNG ingested as ct) gets the per-image robust window. Datasets written before units
were recorded ("") keep the per-modality choice below. The training pipeline decides per modality of a
dataset (`modality_units`): a modality whose shards mix HU and raw samples is normalised robustly as a
whole, which is correct for both (the robust window is invariant to positive affine maps).

Both methods map a window (lo, hi) of each image to [0, 1]: out = clamp((x - lo) / (hi - lo), 0, 1),
computed as (x - lo) * (1 / max(hi - lo, 1e-6)) in float32. They differ in where the window comes from
(chosen per modality by `NormalizeConfig.method`; defaults: CT -> hu_window, MR/XR/US ->
robust_percentile). The same math exists twice: `normalize_numpy` (tests, preview, benchmark chains)
and `normalize_dali` (inside the DALI pipeline: operator `fn.medswav.intensity`, one pass per image on
the CPU, one kernel launch per batch on the GPU; see docs/AUGMENT_OPERATORS.md). They agree to float32
rounding (the windows are the same numbers; tested on real CT and MR slices).

hu_window (CT)
    (lo, hi) = (-1024, 3071) HU: the full 12-bit CT range, so air is 0, water ~0.25, dense bone / metal
    towards 1, and nothing a radiologist would look at is clipped. It expects Hounsfield units. `shards`
    applies the modality LUT (slope/intercept) whenever the result is exact in an integer dtype, which
    is the case for every CT we have met (slope 1, integer intercept); `python -m augment_dali.stats`
    counts reference CT slices whose LUT was NOT applied and warns, since their pixels are raw stored
    values.
robust_percentile (MR, XR, US)
    (lo, hi) = the (0.5, 99.5) percentiles of the image (`NormalizeConfig.robust_percentiles`), exactly
    as numpy.percentile computes them (default "linear" method). MR intensities have no physical unit
    and vary per scanner and series, so a per-image window is the only meaningful one; the percentiles
    keep a few hot or cold pixels from compressing the whole image. The operator reads them off a
    histogram of the integer pixels (one pass; exact, no sorting). The method is invariant to any
    positive affine map of x, so it does not care whether a LUT was applied. A constant image
    (hi == lo) maps to all zeros: no division by zero, no NaN. NaN pixels are left out of the window
    and map to 0.
"""
from __future__ import annotations

import numpy as np

from .config import HU_WINDOW, ROBUST_PERCENTILE, NormalizeConfig

_EPS = 1e-6


def modality_units(units: set[str]) -> str:
    """One units value for a set of samples (e.g. `shards.Dataset.units(modality)`): "HU" when all are
    HU; "raw" when any is raw (robust normalisation is right for HU too, the HU window is not right for
    raw); "" when some are unrecorded and none is raw (legacy behaviour)."""
    if "raw" in units:
        return "raw"
    if units == {"HU"}:
        return "HU"
    return ""


def normalisation_record(modality: str, units: str, config: NormalizeConfig = NormalizeConfig()) -> dict:
    """What the pipeline does to one modality's pixels, as plain values (stored with checkpoints and
    exported backbones; `normalize_record` applies it)."""
    return {"modality": modality, "units": units, "method": config.method_for(modality, units),
            "config": config.to_dict()}


def normalize_record(x: np.ndarray, record: dict) -> np.ndarray:
    """`normalize_numpy` with the method and parameters of a `normalisation_record`."""
    return normalize_numpy(x, record["method"], NormalizeConfig.from_dict(record["config"]))


def _check(method: str) -> None:
    if method not in (HU_WINDOW, ROBUST_PERCENTILE):
        raise ValueError(f"unknown normalisation method {method!r}; use {HU_WINDOW!r} or {ROBUST_PERCENTILE!r}")


def window_numpy(x: np.ndarray, method: str, config: NormalizeConfig = NormalizeConfig()) -> tuple[float, float]:
    """(lo, hi) of one image as float32 values, exactly the window `normalize_dali` applies."""
    _check(method)
    if method == HU_WINDOW:
        lo, hi = config.hu_window
    else:
        values = np.asarray(x, np.float64).ravel()
        values = values[~np.isnan(values)]
        lo, hi = np.percentile(values, config.robust_percentiles) if values.size else (0.0, 0.0)
    return float(np.float32(lo)), float(np.float32(hi))


def normalize_numpy(x: np.ndarray, method: str, config: NormalizeConfig = NormalizeConfig()) -> np.ndarray:
    """NumPy twin of `normalize_dali`: float32 image in [0, 1]."""
    lo, hi = window_numpy(x, method, config)
    inv = np.float32(1.0 / max(hi - lo, _EPS))
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(np.clip((x - np.float32(lo)) * inv, 0.0, 1.0), nan=0.0).astype(np.float32)


def normalize_dali(x, method: str, config: NormalizeConfig = NormalizeConfig(), window_source=None):
    """DALI graph fragment: image DataNode (CPU or GPU; float32, int16, uint16 or uint8) -> float32 in [0, 1].

    On the GPU, robust_percentile needs the same image on the CPU as `window_source` (the percentile
    window is computed there by `fn.medswav.robust_window`, one histogram pass, and applied on the GPU)."""
    import augment_dali
    augment_dali.load_plugin()  # the medswav operators
    from nvidia.dali import fn

    _check(method)
    if method == HU_WINDOW:
        return fn.medswav.intensity(x, window=list(config.hu_window))
    percentiles = list(config.robust_percentiles)
    if x.device == "cpu":
        return fn.medswav.intensity(x, robust=True, percentiles=percentiles)
    if window_source is None:
        raise ValueError("normalize_dali: robust_percentile on the GPU needs window_source (the image on the CPU)")
    return fn.medswav.intensity(x, window=fn.medswav.robust_window(window_source, percentiles=percentiles))
