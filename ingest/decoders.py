"""Rule 1 of ingest.pixels, decoding, with a fixed decoder order so that every transfer syntax decodes.

Order, per frame (the first that succeeds wins; later ones run only after a failure):
1. pydicom 3's own decoder for the transfer syntax with each of its available plugins in the order
   pylibjpeg (libjpeg, openjpeg, RLE), pydicom (its RLE decoder), pyjpegls, Pillow, which is the
   order pydicom used before GDCM was installed; uncompressed syntaxes need no plugin.
2. pydicom's GDCM plugin (python-gdcm).
3. JPEG Extended 12-bit (1.2.840.10008.1.2.4.51), which pydicom's GDCM plugin refuses: GDCM's own
   reader on the whole file (single-sample images only), cached per dataset so that a multi-frame file
   is decoded once. Its memory is the declared decoded size, which plan has bounded by max_pixel_bytes.

Installing python-gdcm also puts GDCM first in pydicom's default plugin order; this module does not
rely on that order, so lossy codestreams keep decoding with the same library (results of lossy JPEG
decoders may differ by one grey level).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

JPEG_EXTENDED_12BIT = "1.2.840.10008.1.2.4.51"
_GDCM_DTYPES = {"UINT8": "u1", "INT8": "i1", "UINT12": "u2", "INT12": "i2", "UINT16": "u2", "INT16": "i2",
                "UINT32": "u4", "INT32": "i4"}
PLUGIN_ORDER = ("pylibjpeg", "pydicom", "pyjpegls", "pillow", "gdcm")
_whole_file: tuple[object, np.ndarray] | None = None  # (dataset, all its frames) of the last GDCM file decode


class DecodeFailed(Exception):
    """Every decoder failed on the frame; the message lists each one's reason."""


def plugin_order(ds) -> list[str]:
    """pydicom plugins to try, in order ("" = the uncompressed decoder, which needs no plugin)."""
    from pydicom.pixels import get_decoder

    ts = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
    if ts is None:
        return [""]
    try:
        available = list(get_decoder(ts).available_plugins)
    except NotImplementedError:
        return [""]  # pydicom raises its own readable error
    if not available:
        return [""]
    return [p for p in PLUGIN_ORDER if p in available] + sorted(set(available) - set(PLUGIN_ORDER))


def decode(ds, frame: int) -> np.ndarray:
    """One frame as pydicom returns it (YBR -> RGB), by the first decoder that reads it."""
    from pydicom.pixels import pixel_array

    failures = []
    for plugin in plugin_order(ds):
        try:
            return pixel_array(ds, index=frame, decoding_plugin=plugin)
        except Exception as e:
            failures.append(_short(e) if plugin else f"pydicom: {_short(e)}")
    if str(ds.file_meta.get("TransferSyntaxUID", "")) == JPEG_EXTENDED_12BIT and _gdcm_available():
        try:
            return gdcm_whole_file(ds)[frame]
        except Exception as e:
            failures.append(f"gdcm reader: {_short(e)}")
    raise DecodeFailed("; ".join(failures))


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())
    # pydicom wraps each plugin's message in "Unable to decode as exceptions were raised by all ... plugins:"
    return text.split("plugins: ", 1)[-1][:160] or type(e).__name__


def _gdcm_available() -> bool:
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def release_decoded() -> None:
    """Drop the cached whole-file GDCM decode (called at the end of each convert task)."""
    global _whole_file
    _whole_file = None


def gdcm_whole_file(ds) -> np.ndarray:
    """Every frame of a single-sample image decoded by GDCM's reader: (frames, rows, cols)."""
    global _whole_file
    if _whole_file is not None and _whole_file[0] is ds:
        return _whole_file[1]
    import gdcm

    spp = int(ds.get("SamplesPerPixel") or 1)
    if spp != 1:
        raise ValueError(f"GDCM reader path handles single-sample images only (SamplesPerPixel = {spp})")
    rows, cols, frames = int(ds.Rows), int(ds.Columns), max(1, int(ds.get("NumberOfFrames") or 1))
    path = getattr(ds, "filename", None)
    temporary = None
    if not (isinstance(path, str) and os.path.isfile(path)):
        fd, temporary = tempfile.mkstemp(suffix=".dcm")
        os.close(fd)
        ds.save_as(temporary)
        path = temporary
    try:
        reader = gdcm.ImageReader()
        reader.SetFileName(path)
        if not reader.Read():
            raise ValueError("GDCM cannot read the file")
        image = reader.GetImage()
        scalar = image.GetPixelFormat().GetScalarTypeAsString()
        if scalar not in _GDCM_DTYPES:
            raise ValueError(f"GDCM pixel format {scalar} is not an integer type")
        buffer = image.GetBuffer()
        if buffer is None:
            raise ValueError("GDCM returned no pixel data")
        raw = buffer.encode("utf-8", "surrogateescape")  # the SWIG binding hands bytes over as str
    finally:
        if temporary:
            os.unlink(temporary)
    dtype = np.dtype(_GDCM_DTYPES[scalar])
    if len(raw) != rows * cols * frames * dtype.itemsize:
        raise ValueError(f"GDCM decoded {len(raw)} bytes, the header declares {frames} x {rows} x {cols} x "
                         f"{dtype.itemsize}")
    arr = np.frombuffer(raw, dtype=dtype).reshape(frames, rows, cols)
    # the bits above BitsStored hold no pixel data: masked (unsigned) or sign-extended (signed), as pydicom does
    bits = int(ds.get("BitsStored") or dtype.itemsize * 8)
    if bits < dtype.itemsize * 8:
        mask = (1 << bits) - 1
        if dtype.kind == "i":
            sign = 1 << (bits - 1)
            arr = (((arr.astype(np.int64) & mask) ^ sign) - sign).astype(dtype)
        else:
            arr = arr & dtype.type(mask)
    _whole_file = (ds, arr)
    return arr
