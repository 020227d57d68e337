"""Fast path of convert for uncompressed pixel data: no second pydicom parse.

Scan already parses each header and locates the Pixel Data element. For files that qualify it records a
*layout* (JSON, column `native_layout` of the inventory, carried into each slice of the plan): where the
pixel bytes start, the geometry and sample format, and every SampleMeta value derived from the header.
Convert then reads one frame with a single `os.pread` and builds it with `np.frombuffer`, exactly as
pydicom 3's native decoder does (`pixel_array(ds, index=frame)`): dtype `u`/`i` + BitsAllocated/8 in
the syntax's byte order; when BitsStored < BitsAllocated, a left shift then an arithmetic right shift by
the unused bits (masks unsigned data, sign-extends signed data; pydicom's `correct_unused_bits`);
reshape to rows x cols (x samples, planar configuration 1 transposed). The pixel rules of
`ingest.pixels` follow unchanged.

A file qualifies only when all of these hold; anything else takes the pydicom path:
- a local path (not an fsspec URL), transfer syntax Implicit/Explicit VR Little Endian or Explicit VR
  Big Endian, a Pixel Data (7FE0,0010) element of defined length holding at least frames x frame bytes;
- BitsAllocated 8, 16 or 32 (not 1-bit; not 8-bit big endian, which pydicom byte-swaps as OW),
  1 <= BitsStored <= BitsAllocated, PixelRepresentation 0 or 1;
- MONOCHROME1/MONOCHROME2 with 1 sample, or RGB with 3 samples and an explicit PlanarConfiguration
  (PALETTE COLOR, YBR_* and others are converted by pydicom);
- no functional groups (enhanced multi-frame objects), no Modality LUT Sequence, at most
  MAX_FRAMES frames (a multi-frame file is parsed once for all its frames anyway).
At convert, a file whose size or modification time differs from the scan goes to the pydicom path
(which then checks the SOPInstanceUID as before).
"""
from __future__ import annotations

import json
import os

import numpy as np

NATIVE_LAYOUT_SYNTAXES = {"1.2.840.10008.1.2": "<", "1.2.840.10008.1.2.1": "<", "1.2.840.10008.1.2.2": ">"}
MAX_FRAMES = 64


def _first(value):
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, str):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


_GROUPS = ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")


def _functional(ds, frame: int, sequence: str, attribute: str):
    """A value from the per-frame, then shared functional groups (enhanced multi-frame objects)."""
    if _GROUPS[0] not in ds and _GROUPS[1] not in ds:  # the common case: skip four failed look-ups
        return None
    for groups, i in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        try:
            item = ds[groups][i]
            return item[sequence][0].get(attribute)
        except (KeyError, IndexError, TypeError, AttributeError):
            continue
    return None


def frame_rescale(ds, frame: int) -> tuple[float, float]:
    slope = _functional(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _functional(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    if slope is None:
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    return (_first(slope) if _first(slope) is not None else 1.0,
            _first(intercept) if _first(intercept) is not None else 0.0)


def header_meta(ds, frame: int) -> dict:
    """Every header-derived value of one frame that convert needs (pixel rules + SampleMeta);
    the single source of these values for both paths. Spacing is before any downsampling."""
    spacing = _functional(ds, frame, "PixelMeasuresSequence", "PixelSpacing") or ds.get("PixelSpacing") \
        or ds.get("ImagerPixelSpacing")
    try:
        spacing = [float(v) for v in spacing] if spacing else None
    except (TypeError, ValueError):
        spacing = None
    thickness = _functional(ds, frame, "PixelMeasuresSequence", "SliceThickness") or ds.get("SliceThickness")
    center = _functional(ds, frame, "FrameVOILUTSequence", "WindowCenter") or ds.get("WindowCenter")
    width = _functional(ds, frame, "FrameVOILUTSequence", "WindowWidth") or ds.get("WindowWidth")
    slope, intercept = frame_rescale(ds, frame)
    return {
        "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
        "rule_bits_stored": int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16),
        "signed": int(ds.get("PixelRepresentation") or 0) == 1,
        "slope": slope, "intercept": intercept,
        "modality_lut_sequence": "ModalityLUTSequence" in ds,
        "pixel_spacing": spacing, "slice_thickness": _first(thickness),
        "window_center": _first(center), "window_width": _first(width),
        "bits_stored": int(ds.get("BitsStored") or 0), "bits_allocated": int(ds.get("BitsAllocated") or 0),
        "pixel_representation": int(ds.get("PixelRepresentation") or 0),
        "transfer_syntax": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""),
        "body_part": str(ds.get("BodyPartExamined", "") or ""),
        "manufacturer": str(ds.get("Manufacturer", "") or ""),
    }


def native_layout(ds, *, src: str, ts: str, value_start: int, value_length: int, file_size: int,
                  mtime_ns: int, salt: str, uid: str | None = None) -> str | None:
    """The JSON layout of a qualifying file (module docstring), or None for the pydicom path.
    `uid` keys the samples (default: the file's SOPInstanceUID; see `ingest.scan.sop_uid`)."""
    from shards import sample_key

    if "://" in src and not src.startswith("file://") or ts not in NATIVE_LAYOUT_SYNTAXES:
        return None
    if value_start < 0 or value_length < 0:
        return None
    if any(k in ds for k in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
                             "ModalityLUTSequence")):
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = max(1, int(ds.get("NumberOfFrames") or 1))
        spp = int(ds.get("SamplesPerPixel") or 1)
        ba = int(ds.BitsAllocated)
        bs = int(ds.get("BitsStored") or ba)
        rep = int(ds.get("PixelRepresentation") or 0)
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
        planar = int(ds.PlanarConfiguration) if spp == 3 and "PlanarConfiguration" in ds else 0
        uid = str(ds.SOPInstanceUID) if uid is None else uid
        meta = header_meta(ds, 0)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    order = NATIVE_LAYOUT_SYNTAXES[ts]
    if ba not in (8, 16, 32) or (ba == 8 and order == ">") or not 1 <= bs <= ba or rep not in (0, 1):
        return None
    if rows <= 0 or cols <= 0 or frames > MAX_FRAMES:
        return None
    if not ((spp == 1 and photometric in ("MONOCHROME1", "MONOCHROME2"))
            or (spp == 3 and photometric == "RGB" and "PlanarConfiguration" in ds and planar in (0, 1))):
        return None
    frame_bytes = rows * cols * spp * ba // 8
    if value_length < frames * frame_bytes or value_start + value_length > file_size:
        return None
    if not uid.strip():
        return None
    return json.dumps({
        "start": value_start, "frame_bytes": frame_bytes, "size": file_size, "mtime_ns": mtime_ns,
        "rows": rows, "cols": cols, "spp": spp, "planar": planar,
        "dtype": f"{order}{'ui'[rep]}{ba // 8}", "shift": ba - bs,
        "keys": [sample_key(uid, f, salt) for f in range(frames)], "meta": meta,
    }, separators=(",", ":"))


class Changed(Exception):
    """The file is not the one scanned (size or modification time differ)."""


def read_frame(layout: dict, path: str, frame: int) -> np.ndarray:
    """pydicom's `pixel_array(ds, index=frame)` of a qualifying file, from one positioned read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if st.st_size != layout["size"] or st.st_mtime_ns != layout["mtime_ns"]:
            raise Changed(path)
        n = layout["frame_bytes"]
        buf = np.empty(n, dtype=np.uint8)  # read straight into a writable array: no copy for the shifts
        got = os.preadv(fd, [buf], layout["start"] + frame * n)
    finally:
        os.close(fd)
    if got != n:
        raise Changed(path)
    arr = buf.view(np.dtype(layout["dtype"]))
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    shift = layout["shift"]
    if shift:
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    rows, cols, spp = layout["rows"], layout["cols"], layout["spp"]
    if spp == 1:
        return arr.reshape(rows, cols)
    if layout["planar"] == 0:
        return arr.reshape(rows, cols, spp)
    return arr.reshape(spp, rows, cols).transpose(1, 2, 0)
