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

    method: dict[str, str] = field(default_factory=lambda: {
        "ct": HU_WINDOW, "mr": ROBUST_PERCENTILE, "xr": ROBUST_PERCENTILE, "us": ROBUST_PERCENTILE})
    hu_window: tuple[float, float] = (-1024.0, 3071.0)  # full 12-bit CT range in Hounsfield units
    # per-image window (lo, hi) = these percentiles of the image: a few hot or cold pixels cannot set it
    robust_percentiles: tuple[float, float] = (0.5, 99.5)

    def method_for(self, modality: str) -> str:
        return self.method.get(modality, ROBUST_PERCENTILE)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hu_window"] = list(self.hu_window)
        d["robust_percentiles"] = list(self.robust_percentiles)
        return d


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the augmentation family A (METHOD.md section 4), one sample at a time."""

    scale_range: tuple[float, float] = (0.1, 0.7)     # rescale factor s ~ U[lo, hi]
    size_range: tuple[int, int] = (600, 1200)         # output sides clamped into [min, max]
    sigmas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)  # Gaussian cascade -> 5 bands + residual
    gamma_range: tuple[float, float] = (1.8, 2.6)
    linear_scale_range: tuple[float, float] = (0.9, 1.1)
    linear_shift_range: tuple[float, float] = (-0.2, 0.2)  # in units of the [0, 1] intensity range
    p_gamma: float = 0.5   # each view gets ONE intensity transform: gamma (p) or linear (1 - p)
    crop_sizes: tuple[int, ...] = (224, 92)
    num_crops: tuple[int, ...] = (2, 6)
    border: float = 0.1    # up to this fraction of each side may be cut away by the crops
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)

    def __post_init__(self):
        if len(self.crop_sizes) != len(self.num_crops):
            raise ValueError(f"crop_sizes {self.crop_sizes} and num_crops {self.num_crops} differ in length")
        if not 0.0 <= self.p_gamma <= 1.0:
            raise ValueError(f"p_gamma must be in [0, 1], got {self.p_gamma}")
        lo, hi = self.size_range
        if not 0 < lo <= hi:
            raise ValueError(f"size_range must satisfy 0 < min <= max, got {self.size_range}")

    @property
    def num_bands(self) -> int:
        return len(self.sigmas) + 1

    @classmethod
    def small(cls, **overrides) -> "AugmentConfig":
        """Sizes for 28 x 28 MedMNIST images and fast tests: sides in [48, 96], crops 2 x 32 + 6 x 16."""
        base = dict(size_range=(48, 96), sigmas=(1.0, 2.0, 4.0, 8.0, 16.0), crop_sizes=(32, 16),
                    num_crops=(2, 6))
        base.update(overrides)
        return cls(**base)
