"""What one sample carries besides its pixels."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

MODALITIES = ("ct", "mr", "xr", "us")
# What the stored pixel values mean (SampleMeta.units); "" = not recorded (datasets written before units).
UNITS_HU = "HU"    # Hounsfield units: CT whose modality LUT was applied exactly (or `--units HU` arrays)
UNITS_RAW = "raw"  # anything else: stored values without a physical unit (MR, XR, US, 8-bit images, ...)
UNITS = (UNITS_HU, UNITS_RAW)
SPLITS = ("train", "val", "test")  # "test" only where a source brings its own split (e.g. MedMNIST)


@dataclass
class SampleMeta:
    """Non-identifying metadata of one 2-D sample, stored as `<key>.json`.

    Identifiers appear only as salted hashes (`*_hash`). Free text, names, dates, accession numbers,
    institution and physician names have no field here on purpose.
    """

    modality: str
    split: str
    rows: int = 0
    cols: int = 0
    dtype: str = ""
    frame: int = 0
    frames: int = 1
    sop_hash: str = ""
    series_hash: str = ""
    study_hash: str = ""
    patient_hash: str = ""
    source_hash: str = ""
    pixel_spacing: list[float] | None = None
    slice_thickness: float | None = None
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    rescale_applied: bool = False
    photometric: str = ""
    bits_stored: int = 0
    bits_allocated: int = 0
    pixel_representation: int = 0
    transfer_syntax: str = ""
    body_part: str = ""
    manufacturer: str = ""
    window_center: float | None = None
    window_width: float | None = None
    labels: dict[str, float] | None = None
    units: str = ""

    def validate(self) -> None:
        if self.units and self.units not in UNITS:
            raise ValueError(f"unknown units {self.units!r}; expected one of {UNITS}")
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; expected one of {MODALITIES}")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; expected one of {SPLITS}")

    def to_json(self) -> bytes:
        # a flat dict instead of asdict(), whose recursive deep copy costs more than the encoding
        values = {name: getattr(self, name) for name in _FIELD_NAMES}
        return json.dumps(values, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> "SampleMeta":
        raw = json.loads(data)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


_FIELD_NAMES = tuple(f.name for f in fields(SampleMeta))
