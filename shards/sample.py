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
# What a dataset's samples are (dataset.json "kind"): one dataset holds one kind.
KIND_SLICES = "slices"    # 2-D samples (rows, cols); a dataset.json without "kind" holds slices
KIND_VOLUMES = "volumes"  # 3-D samples (depth, rows, cols), one per DICOM series / volume file
KINDS = (KIND_SLICES, KIND_VOLUMES)


@dataclass
class SampleMeta:
    """Non-identifying metadata of one sample, stored as `<key>.json`.

    A 2-D sample has `depth` 0. A volume sample (format version 2) has `depth` >= 2 slices of
    `rows` x `cols`, `frame` 0, `frames` = depth, `spacing` [z, y, x] mm, `direction` (9 floats, row-major
    3x3 whose columns are the x, y, z axes in patient LPS, as SimpleITK's GetDirection()) and `origin`
    (3 floats, mm: the centre of voxel [0, 0, 0]).

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
    depth: int = 0
    spacing: list[float] | None = None
    direction: list[float] | None = None
    origin: list[float] | None = None

    def validate(self) -> None:
        if self.depth == 1 or self.depth < 0:
            raise ValueError(f"depth must be 0 (2-D sample) or >= 2 (volume), got {self.depth}")
        for name, size in (("spacing", 3), ("direction", 9), ("origin", 3)):
            value = getattr(self, name)
            if value is not None and len(value) != size:
                raise ValueError(f"{name} must hold {size} numbers, got {len(value)}")
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
