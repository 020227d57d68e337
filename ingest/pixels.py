"""The pixel rules: from one decoded DICOM frame to the 2-D integer array stored in a shard.

Applied in this order (each rule is exact or documented as rounding):

1. Decoding: pydicom 3 and its plugins (`pixel_array(ds, index=frame)`) in the order of
   ingest.decoders (GDCM last, in a child process: it aborts its process on some damaged codestreams),
   with pydicom's default colour handling (YBR_* decoded to RGB).
   Big-endian arrays become native little-endian.
2. Colour -> one channel:
   - PALETTE COLOR: pydicom's `apply_color_lut` (RGB in the LUT's depth, usually uint16), then luma.
   - RGB (and YBR_* after decoding): ITU-R BT.601 luma  Y = 0.299 R + 0.587 G + 0.114 B in exact
     integer arithmetic, rounded half up: Y = (299 R + 587 G + 114 B + 500) // 1000, stored in the
     unsigned dtype of the samples (the weights sum to 1, so Y never overflows).
3. MONOCHROME1 (dark = high values) is reflected so that high = bright for every sample, within the
   BitsStored range: unsigned  x -> (2**BitsStored - 1) - x  (bits above BitsStored, which hold no
   pixel data, are masked first); signed  x -> -1 - x  (maps the signed range onto itself). Done on
   stored values, before the modality LUT.
4. Modality LUT (Rescale Slope / Intercept, per frame from the functional groups when present):
   applied only when it is exact in an integer dtype: slope and intercept are integers and
   slope * x + intercept of this frame fits the first of (stored dtype, int16, int32) that holds its
   minimum and maximum. Then `rescale_applied = True`. Otherwise (fractional slope, a Modality LUT
   Sequence, or no fitting dtype) the stored values are kept and slope / intercept are recorded in
   the sample's JSON for the consumer. Identity (1, 0) counts as applied.
5. Optional maximum side length: when max(rows, cols) > max_side, the image is reduced by the integer
   factor k = ceil(max(rows, cols) / max_side) with a k x k block mean (float64, rounded half-to-even,
   same dtype); trailing rows / columns that do not fill a whole block (fewer than k) are dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LUMA_BT601_PERMILLE = (299, 587, 114)  # ITU-R BT.601 luma weights x 1000
_INT_CANDIDATES = (np.dtype(np.int16), np.dtype(np.int32))


@dataclass
class PixelInfo:
    """What the rules did to one frame (goes into SampleMeta)."""

    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    rescale_applied: bool = False
    inverted: bool = False
    colour_to_luma: bool = False
    downsample: int = 1


def native(arr: np.ndarray) -> np.ndarray:
    """Little-endian/native byte order, same values."""
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an (..., 3) unsigned integer image in exact integer arithmetic:
    Y = floor((299 R + 587 G + 114 B + 500) / 1000), i.e. rounded half up; same dtype."""
    if rgb.dtype.kind != "u":
        raise ValueError(f"colour samples must be unsigned integers, got {rgb.dtype}")
    c = rgb.astype(np.int64)
    y = (LUMA_BT601_PERMILLE[0] * c[..., 0] + LUMA_BT601_PERMILLE[1] * c[..., 1]
         + LUMA_BT601_PERMILLE[2] * c[..., 2] + 500) // 1000
    return y.astype(rgb.dtype)  # weights sum to 1000: y never exceeds the dtype's maximum


def invert_monochrome1(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    # both results always fit the dtype, so they are computed in it: -1 - x is two's complement NOT
    if signed:
        return np.invert(arr)
    top = np.asarray((1 << bits_stored) - 1, dtype=arr.dtype)
    masked = arr & top if bits_stored < arr.dtype.itemsize * 8 else arr
    return np.subtract(top, masked, dtype=arr.dtype)


def exact_rescale(arr: np.ndarray, slope: float, intercept: float) -> np.ndarray | None:
    """slope * arr + intercept in an integer dtype if that is exact; else None."""
    if slope == 1 and intercept == 0:
        return arr
    if not (float(slope).is_integer() and float(intercept).is_integer()):
        return None
    s, b = int(slope), int(intercept)
    lo, hi = int(arr.min()), int(arr.max())
    ends = (s * lo + b, s * hi + b)
    lo2, hi2 = min(ends), max(ends)
    for dt in (arr.dtype, *_INT_CANDIDATES):
        info = np.iinfo(dt)
        if info.min <= lo2 and hi2 <= info.max:
            # computed in dt itself, modulo 2**bits: exact, because every result fits dt (x, s and b
            # need not: they wrap on the way and the wrapped result is still the true one)
            work = arr if s == 1 else np.multiply(arr, _wrapped(s, dt), dtype=dt, casting="unsafe")
            return np.add(work, _wrapped(b, dt), dtype=dt, casting="unsafe")
    return None


def _wrapped(value: int, dt: np.dtype) -> np.ndarray:
    """`value` modulo 2**bits as a scalar of integer dtype dt."""
    return np.array(value % (1 << (8 * dt.itemsize)), dtype=np.uint64).astype(dt)


def block_mean(arr: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    rows, cols = arr.shape
    k = math.ceil(max(rows, cols) / max_side)
    if k <= 1:
        return arr, 1
    r, c = rows // k, cols // k
    if r == 0 or c == 0:
        raise ValueError(f"image {rows}x{cols} too thin to reduce by {k}")
    blocks = arr[: r * k, : c * k].astype(np.float64).reshape(r, k, c, k)
    return np.rint(blocks.mean(axis=(1, 3))).astype(arr.dtype), k


def to_stored(frame: np.ndarray, *, photometric: str, bits_stored: int, signed: bool,
              slope: float, intercept: float, modality_lut_sequence: bool = False,
              palette_rgb: np.ndarray | None = None, max_side: int | None = None,
              ) -> tuple[np.ndarray, PixelInfo]:
    """Apply rules 2-5 to one decoded frame (rule 1 is the caller's decode).

    `palette_rgb` is the frame after `apply_color_lut` for PALETTE COLOR sources.
    """
    info = PixelInfo(rescale_slope=float(slope), rescale_intercept=float(intercept))
    arr = native(palette_rgb if palette_rgb is not None else frame)
    if arr.ndim == 3:
        if arr.shape[-1] != 3:
            raise ValueError(f"unsupported samples per pixel: shape {arr.shape}")
        arr = luma(arr)
        info.colour_to_luma = True
        info.rescale_applied = (slope, intercept) == (1, 0)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"non-integer pixels ({arr.dtype}) are not supported")
    if not info.colour_to_luma:
        if photometric == "MONOCHROME1":
            arr = invert_monochrome1(arr, bits_stored, signed)
            info.inverted = True
        rescaled = None if modality_lut_sequence else exact_rescale(arr, slope, intercept)
        if rescaled is not None:
            arr, info.rescale_applied = rescaled, True
    if max_side is not None:
        arr, info.downsample = block_mean(arr, max_side)
    return np.ascontiguousarray(arr), info
