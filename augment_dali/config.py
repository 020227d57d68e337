"""Typed configuration of the augmentation pipeline: the one place for its defaults.

Defaults are METHOD.md section 4/5 (2-D): rescale s ~ U[0.1, 0.7] with sides kept in [600, 1200],
energy bands with sigmas 1, 2, 4, 8, 16 px, gamma ~ U[1.8, 2.6], linear a ~ U[0.9, 1.1] and
b ~ U[-0.2, 0.2], multi-crop 2 x 224 + 6 x 92 with 10 % border. Small images (MedMNIST 28 x 28) and
fast tests use smaller sizes; every field can be overridden.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Normalisation methods (see augment_dali.normalize for the exact formulas).
HU_WINDOW = "hu_window"
ROBUST_PERCENTILE = "robust_percentile"


@dataclass(frozen=True)
class NormalizeConfig:
    """How raw integer pixels of each modality become floats in [0, 1]."""

    method: dict[str, str] = field(default_factory=lambda: {  # per modality: hu_window or robust_percentile
        "ct": HU_WINDOW, "mr": ROBUST_PERCENTILE, "xr": ROBUST_PERCENTILE, "us": ROBUST_PERCENTILE})
    hu_window: tuple[float, float] = (-1024.0, 3071.0)  # HU mapped to [0, 1] (full 12-bit CT range)
    # a few hot or cold pixels cannot set the window
    robust_percentiles: tuple[float, float] = (0.5, 99.5)  # per-image window (lo, hi) = these percentiles

    def __post_init__(self):
        wrong = {m: v for m, v in self.method.items() if v not in (HU_WINDOW, ROBUST_PERCENTILE)}
        if wrong:
            raise ValueError(f"normalize.method {wrong}: choose {HU_WINDOW} or {ROBUST_PERCENTILE}")
        if not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"normalize.hu_window {self.hu_window}: needs lo < hi")

    def method_for(self, modality: str, units: str = "") -> str:
        """The method for a modality's pixels in `units` (shards.SampleMeta.units): "raw" values have no
        physical unit, so they always get the per-image robust window (the HU window would squeeze e.g.
        8-bit images into 0.25..0.31); "HU" gets the modality's configured method; "" (datasets written
        before units were recorded) keeps the per-modality method as it was."""
        if units == "raw":
            return ROBUST_PERCENTILE
        return self.method.get(modality, ROBUST_PERCENTILE)

    @classmethod
    def from_dict(cls, d: dict) -> "NormalizeConfig":
        """Inverse of `to_dict` (e.g. the normalisation stored in an exported backbone)."""
        return cls(method=dict(d["method"]), hu_window=tuple(d["hu_window"]),
                   robust_percentiles=tuple(d["robust_percentiles"]))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hu_window"] = list(self.hu_window)
        d["robust_percentiles"] = list(self.robust_percentiles)
        return d


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the augmentation family A (METHOD.md section 4), one sample at a time."""

    scale_range: tuple[float, float] = (0.1, 0.7)     # rescale factor s ~ U[lo, hi]
    size_range: tuple[int, int] = (600, 1200)         # output sides (rows, cols) clamped into [min, max]
    depth_range: tuple[int, int] = (96, 200)          # volumes: output depth clamped into [min, max]
    sigmas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)  # Gaussian cascade (px) -> 5 bands + residual
    energy_bands: bool = True  # re-weight the bands to drawn reference energies (off: ablations, docs/EVALUATION.md s7)
    gamma_range: tuple[float, float] = (1.8, 2.6)     # gamma ~ U[lo, hi] of the gamma transform
    linear_scale_range: tuple[float, float] = (0.9, 1.1)   # a ~ U[lo, hi] of the linear transform a*x + b
    linear_shift_range: tuple[float, float] = (-0.2, 0.2)  # b ~ U[lo, hi], in units of the [0, 1] range
    p_gamma: float = 0.5   # each view gets ONE intensity transform: gamma (p) or linear (1 - p)
    crop_sizes: tuple[int, ...] = (224, 92)   # side of each crop group (group 0: full resolution)
    num_crops: tuple[int, ...] = (2, 6)       # crops per group
    crop_depths: tuple[int, ...] = ()         # volumes: depth of each group's crops (empty: 2-D images)
    border: float = 0.1    # up to this fraction of each side may be cut away by the crops
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)  # raw pixels -> [0, 1]

    def __post_init__(self):
        if len(self.crop_sizes) != len(self.num_crops):
            raise ValueError(f"crop_sizes {self.crop_sizes} and num_crops {self.num_crops} differ in length")
        if self.crop_depths and len(self.crop_depths) != len(self.crop_sizes):
            raise ValueError(f"crop_depths {self.crop_depths} needs one depth per crop group {self.crop_sizes}")
        if not 0.0 <= self.p_gamma <= 1.0:
            raise ValueError(f"p_gamma must be in [0, 1], got {self.p_gamma}")
        lo, hi = self.size_range
        if not 0 < lo <= hi:
            raise ValueError(f"size_range must satisfy 0 < min <= max, got {self.size_range}")
        lo, hi = self.depth_range
        if not 0 < lo <= hi:
            raise ValueError(f"depth_range must satisfy 0 < min <= max, got {self.depth_range}")
        for name in ("scale_range", "gamma_range", "linear_scale_range", "linear_shift_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} must satisfy min <= max (equal: a fixed value), got {getattr(self, name)}")
        if not 0.0 <= self.border < 0.5:
            raise ValueError(f"border must be in [0, 0.5), got {self.border}")

    @property
    def volumes(self) -> bool:
        """3-D crops (crop_depths given): the pipeline expects "DHW" volumes."""
        return bool(self.crop_depths)

    @property
    def num_bands(self) -> int:
        return len(self.sigmas) + 1

    @classmethod
    def method_3d(cls, **overrides) -> "AugmentConfig":
        """METHOD.md section 5, 3-D column: sides (rows, cols) in [112, 250], depth in [96, 200], one
        224 x 224 x 192 crop and four 112 x 112 x 96 crops (configs/swav_3d_ct.toml holds the same)."""
        base = dict(size_range=(112, 250), depth_range=(96, 200), crop_sizes=(224, 112), crop_depths=(192, 96),
                    num_crops=(1, 4))
        base.update(overrides)
        return cls(**base)

    @classmethod
    def small(cls, **overrides) -> "AugmentConfig":
        """Sizes for 28 x 28 MedMNIST images and fast tests: sides in [48, 96], crops 2 x 32 + 6 x 16."""
        base = dict(size_range=(48, 96), sigmas=(1.0, 2.0, 4.0, 8.0, 16.0), crop_sizes=(32, 16),
                    num_crops=(2, 6))
        base.update(overrides)
        return cls(**base)
