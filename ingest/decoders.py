"""Rule 1 of ingest.pixels, decoding, with a fixed decoder order so that every transfer syntax decodes.

Order, per frame (the first that succeeds wins; later ones run only after a failure):
1. pydicom 3's own decoder for the transfer syntax with each of its available plugins in the order
   pylibjpeg (libjpeg, openjpeg, RLE), pydicom (its RLE decoder), pyjpegls, Pillow, which is the
   order pydicom used before GDCM was installed; uncompressed syntaxes need no plugin. JPEG-LS
   (lossless and near-lossless) goes to pyjpegls (CharLS) first: 5 ms per 512 x 512 CT slice against
   18 ms with libjpeg, and JPEG-LS decoding is exactly specified, so every conformant decoder returns
   the same pixels (the read-back tests compare ours with libjpeg's).
2. pydicom's GDCM plugin (python-gdcm).
3. JPEG Extended 12-bit (1.2.840.10008.1.2.4.51), which pydicom's GDCM plugin refuses: GDCM's own
   reader on the whole file (single-sample images only), cached per dataset so that a multi-frame file
   is decoded once. At its peak it holds about three copies of the declared decoded size (GDCM's
   buffer, the str the binding returns, its bytes), a rare path that plan bounds by max_pixel_bytes.

Before any decoder runs, the frame's codestream header (JPEG / JPEG-LS SOF, JPEG 2000 SIZ) must not
declare more samples than the DICOM header: decoders size their output from the codestream, so a 512 x
512 frame whose codestream claims 12000 x 12000 would otherwise cost ~0.8 GB (measured with
pylibjpeg), beyond the max_pixel_bytes budget that plan checked against the DICOM header.

Installing python-gdcm also puts GDCM first in pydicom's default plugin order; this module does not
rely on that order, so lossy codestreams keep decoding with the same library (results of lossy JPEG
decoders may differ by one grey level).
"""
from __future__ import annotations

import os
import struct
import tempfile
from contextlib import contextmanager

import numpy as np

from .scan import Rejected

JPEG_EXTENDED_12BIT = "1.2.840.10008.1.2.4.51"
_GDCM_DTYPES = {"UINT8": "u1", "INT8": "i1", "UINT12": "u2", "INT12": "i2", "UINT16": "u2", "INT16": "i2",
                "UINT32": "u4", "INT32": "i4"}
PLUGIN_ORDER = ("pylibjpeg", "pydicom", "pyjpegls", "pillow", "gdcm")
JPEG_LS_SYNTAXES = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}  # lossless, near-lossless
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
    others = sorted(set(available) - set(PLUGIN_ORDER))  # plugins of later pydicom versions: before GDCM
    order = [p for p in PLUGIN_ORDER[:-1] if p in available]
    if str(ts) in JPEG_LS_SYNTAXES and "pyjpegls" in order:
        order.remove("pyjpegls")
        order.insert(0, "pyjpegls")
    return order + others + [p for p in ("gdcm",) if p in available]


def decode(ds, frame: int) -> np.ndarray:
    """One frame as pydicom returns it (YBR -> RGB), by the first decoder that reads it."""
    from pydicom.pixels import pixel_array

    from .isolated_decode import gdcm_in_child

    check_codestream(ds, frame)
    failures = []
    for plugin in plugin_order(ds):
        try:
            if plugin == "gdcm":  # GDCM aborts its process on some damaged codestreams: in a child
                return gdcm_in_child(ds, frame, "plugin")
            return pixel_array(ds, index=frame, decoding_plugin=plugin)
        except Exception as e:
            failures.append(_short(e) if plugin else f"pydicom: {_short(e)}")
    if str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")) == JPEG_EXTENDED_12BIT and _gdcm_available():
        try:
            return _whole_file_in_child(ds)[frame]
        except Exception as e:
            failures.append(f"gdcm reader: {_short(e)}")
    raise DecodeFailed("; ".join(failures))


def _whole_file_in_child(ds) -> np.ndarray:
    """gdcm_whole_file run in a child process (ingest.isolated_decode), cached per dataset."""
    global _whole_file
    if _whole_file is not None and _whole_file[0] is ds:
        return _whole_file[1]
    from .isolated_decode import gdcm_in_child

    arr = gdcm_in_child(ds, 0, "whole")
    _whole_file = (ds, arr)
    return arr


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # F7: JPEG-LS


def codestream_geometry(data: bytes) -> tuple[str, int, int, int] | None:
    """(kind, rows, columns, components) declared by a JPEG, JPEG-LS or JPEG 2000 codestream header;
    None when the data starts with neither (other syntaxes) or the header cannot be found."""
    if data[:2] == b"\xff\xd8":  # JPEG / JPEG-LS: marker segments up to the start-of-frame
        pos = 2
        while pos + 9 <= len(data):
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in _JPEG_SOF:
                rows, cols, comps = struct.unpack(">HHB", data[pos + 5:pos + 10])
                return "JPEG", rows, cols, comps
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                pos += 2
                continue
            pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        return None
    siz = data.find(b"\xff\x4f\xff\x51", 0, 4096)  # JPEG 2000: SOC then SIZ (also inside a JP2 box)
    if siz < 0 or siz + 42 > len(data):
        return None
    x, y, x0, y0 = struct.unpack(">IIII", data[siz + 8:siz + 24])
    comps = struct.unpack(">H", data[siz + 40:siz + 42])[0]
    return "JPEG 2000", max(0, y - y0), max(0, x - x0), comps


def check_codestream(ds, frame: int) -> None:
    """Reject a compressed frame whose codestream declares more samples than the DICOM header."""
    from pydicom.encaps import get_frame

    if "PixelData" not in ds or not getattr(ds["PixelData"], "is_undefined_length", False):
        return
    frames = max(1, int(ds.get("NumberOfFrames") or 1))
    try:
        data = get_frame(ds.PixelData, frame, number_of_frames=frames)
    except Exception:
        return  # the decoders report what is wrong with the encapsulation
    found = codestream_geometry(bytes(data[:8192]))
    if found is None:
        return
    kind, rows, cols, comps = found
    h_rows, h_cols, h_spp = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel") or 1)
    if rows * cols * comps > h_rows * h_cols * h_spp:
        raise Rejected("codestream larger than header",
                       f"frame {frame}: the {kind} codestream declares {rows} x {cols} x {comps} samples, the "
                       f"DICOM header {h_rows} x {h_cols} x {h_spp}: not decoded")


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


@contextmanager
def file_of(ds):
    """The path of a file holding `ds`: its own file, else a temporary copy removed afterwards."""
    path = getattr(ds, "filename", None)
    if isinstance(path, str) and os.path.isfile(path):
        yield path
        return
    fd, temporary = tempfile.mkstemp(suffix=".dcm")
    os.close(fd)
    try:
        ds.save_as(temporary)
        yield temporary
    finally:
        os.unlink(temporary)


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
    with file_of(ds) as path:
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


_ITEM, _SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"


def check_fragment_count(fp, pixel_offset: int, frames: int) -> None:
    """Reject encapsulated Pixel Data with fewer fragments than NumberOfFrames (each frame needs at least
    one): a header declaring 1,000,000 frames over a few bytes of data must not become 1,000,000 planned
    slices. Reads only item headers (8 bytes each), and stops once `frames` fragments are found.

    `pixel_offset` is where the (7FE0,0010) element starts; encapsulated data is always explicit VR
    little endian, so its value (the offset table item, then the fragments) starts 12 bytes later.
    """
    if frames <= 1:
        return
    pos, fragments, first = pixel_offset + 12, 0, True
    while fragments < frames:
        fp.seek(pos)
        head = fp.read(8)
        if len(head) < 8 or head[:4] != _ITEM:
            break  # end of file, sequence delimiter or damage: what was counted is what there is
        length = struct.unpack("<I", head[4:])[0]
        if length == 0xFFFFFFFF:
            break
        if not first:  # the first item is the basic offset table
            fragments += 1
        first = False
        pos += 8 + length
    if fragments < frames:
        raise Rejected("implausible frame count",
                       f"NumberOfFrames = {frames:,} but the encapsulated Pixel Data holds {fragments:,} "
                       f"fragment(s); every frame needs at least one")
