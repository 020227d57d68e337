"""Fast path of scan: the two dozen header values ingestion needs, without pydicom's full parse.

pydicom's `dcmread(stop_before_pixels=True)` builds every element of the header (sequences included)
and converts each value on access: about 1 ms per file, as much as decoding an uncompressed slice. Scan
needs ~25 top-level values and where the Pixel Data element starts. `parse_header` walks the element
headers (skipping values by their length, sequences of undefined length item by item) and converts
only the values it needs, with pydicom's own rules for those value representations:

- text (UI, CS, LO, SH): trailing spaces and NULs removed; accepted only as printable ASCII without a
  backslash (so every character set decodes them alike and there is exactly one value);
- US: one unsigned 16-bit value; IS: one integer; DS: one float, or a list for several values;
- an empty IS or DS is None (pydicom's empty value); a wanted sequence is only noted as present.

Anything it does not handle exactly like pydicom makes it return None, and scan takes the pydicom path
for that file: no "DICM" preamble, transfer syntaxes other than Implicit / Explicit VR Little Endian and
the encapsulated ones built on Explicit VR Little Endian (so big endian and deflate go to pydicom), a
wanted element with an unexpected VR, several values or non-ASCII text, an empty US, a value that does
not parse, a dataset that looks explicit under an implicit syntax, any truncation or malformed
structure. Equality with pydicom's values is tested on every real file we have (tests/test_ingest_header.py).
"""
from __future__ import annotations

import re
import struct
from types import SimpleNamespace

IMPLICIT_LE = "1.2.840.10008.1.2"
NOT_EXPLICIT_LE = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflated: pydicom

# tag -> (keyword, VR in the data dictionary)
WANTED = {
    0x00080005: ("SpecificCharacterSet", "CS"),
    0x00080016: ("SOPClassUID", "UI"),
    0x00080018: ("SOPInstanceUID", "UI"),
    0x00080060: ("Modality", "CS"),
    0x00080070: ("Manufacturer", "LO"),
    0x00100020: ("PatientID", "LO"),
    0x00180015: ("BodyPartExamined", "CS"),
    0x00180050: ("SliceThickness", "DS"),
    0x00181164: ("ImagerPixelSpacing", "DS"),
    0x0020000D: ("StudyInstanceUID", "UI"),
    0x0020000E: ("SeriesInstanceUID", "UI"),
    0x00280002: ("SamplesPerPixel", "US"),
    0x00280004: ("PhotometricInterpretation", "CS"),
    0x00280006: ("PlanarConfiguration", "US"),
    0x00280008: ("NumberOfFrames", "IS"),
    0x00280010: ("Rows", "US"),
    0x00280011: ("Columns", "US"),
    0x00280030: ("PixelSpacing", "DS"),
    0x00280100: ("BitsAllocated", "US"),
    0x00280101: ("BitsStored", "US"),
    0x00280103: ("PixelRepresentation", "US"),
    0x00281050: ("WindowCenter", "DS"),
    0x00281051: ("WindowWidth", "DS"),
    0x00281052: ("RescaleIntercept", "DS"),
    0x00281053: ("RescaleSlope", "DS"),
    0x00281054: ("RescaleType", "LO"),  # pixel units: "HU" only for CT in Hounsfield (ingest.convert.pixel_units)
    0x00282110: ("LossyImageCompression", "CS"),
    0x00283000: ("ModalityLUTSequence", "SQ"),
    0x52009229: ("SharedFunctionalGroupsSequence", "SQ"),
    0x52009230: ("PerFrameFunctionalGroupsSequence", "SQ"),
}
PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # where pydicom's stop_before_pixels stops
TRANSFER_SYNTAX_TAG = 0x00020010
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF

LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
             b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
VRS = LONG_VRS | SHORT_VRS
# character sets under which printable ASCII decodes to itself (ISO 2022 code extensions excluded)
ASCII_CHARSETS = {"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126",
                  "ISO_IR 127", "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166", "ISO_IR 192",
                  "ISO_IR 203", "GB18030", "GBK"}

_PRINTABLE = re.compile(rb"[\x20-\x5b\x5d-\x7e]*\Z")  # printable ASCII except backslash
_INT = re.compile(rb" *[+-]?[0-9]+ *\Z")
_NUMBERS = re.compile(rb"[0-9+\-.eE \\]+\Z")
_U16, _U32, _HHI = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<HHI")
CHUNK = 16384
MAX_SEQUENCE_DEPTH = 16


class Unsupported(Exception):
    """Not handled here exactly as pydicom would: the caller takes the pydicom path."""


class FastHeader:
    """The subset of a pydicom Dataset's interface that scan, `ingest.native` and `header_meta` use."""

    def __init__(self, values: dict, transfer_syntax: str, implicit: bool, pixel_offset: int):
        self._values = values
        self.file_meta = SimpleNamespace(TransferSyntaxUID=transfer_syntax)
        self.original_encoding = (implicit, True)
        self.pixel_offset = pixel_offset  # the Pixel Data element's header; the file size when absent

    def get(self, keyword: str, default=None):
        return self._values.get(keyword, default)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self._values

    def __getattr__(self, keyword: str):
        try:
            return self.__dict__["_values"][keyword]
        except KeyError:
            raise AttributeError(keyword) from None


class _Reader:
    """Positioned reads through a small window, so skipped values are never read."""

    def __init__(self, fp, size: int):
        self.fp, self.size = fp, size
        self.base, self.buf = 0, b""

    def window(self, pos: int, n: int) -> bytes:
        """The buffer, now holding [pos, pos + n) at pos - self.base."""
        if pos < 0 or pos + n > self.size:
            raise Unsupported("truncated")
        if pos < self.base or pos + n > self.base + len(self.buf):
            self.fp.seek(pos)
            self.buf, self.base = self.fp.read(max(n, CHUNK)), pos
            if len(self.buf) < n:
                raise Unsupported("short read")
        return self.buf

    def read(self, pos: int, n: int) -> bytes:
        buf = self.window(pos, n)
        return buf[pos - self.base:pos - self.base + n]


def _element(r: _Reader, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value position) of the element whose header starts at pos."""
    buf, off = r.buf, pos - r.base
    if off < 0 or off + 12 > len(buf):  # the hot loop stays inside the window; this refills it
        buf = r.window(pos, 12 if pos + 12 <= r.size else 8)
        off = pos - r.base
    group, elem, length = _HHI.unpack_from(buf, off)
    tag = (group << 16) | elem
    if group == 0xFFFE or not explicit:
        return tag, None, length, pos + 8
    vr = buf[off + 4:off + 6]
    if vr in SHORT_VRS:
        return tag, vr, length >> 16, pos + 8  # bytes 6-8: the 16-bit length
    if vr in LONG_VRS:
        if off + 12 > len(buf):
            raise Unsupported("truncated")
        return tag, vr, _U32.unpack_from(buf, off + 8)[0], pos + 12
    raise Unsupported(f"unknown VR {vr!r}")


def _skip_sequence(r: _Reader, pos: int, explicit: bool, depth: int) -> int:
    """Position after a sequence of undefined length whose first item starts at pos."""
    if depth > MAX_SEQUENCE_DEPTH:
        raise Unsupported("sequences nested too deep")
    while True:
        tag, _, length, pos = _element(r, pos, False)
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            raise Unsupported("malformed sequence")
        if length != UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: its elements up to the item delimiter
            tag, vr, length, value = _element(r, pos, explicit)
            if tag == ITEM_END:
                pos = value
                break
            if length == UNDEFINED:
                # an undefined-length UN holds implicit VR little endian (PS3.5 6.2.2)
                pos = _skip_sequence(r, value, explicit and vr != b"UN", depth + 1)
            else:
                pos = value + length


def _text(raw: bytes) -> str:
    raw = raw.rstrip(b" \x00")
    if not _PRINTABLE.match(raw):
        raise Unsupported("non-ASCII or multi-valued text")
    return raw.decode("ascii")


def _value(raw: bytes, vr: str):
    if vr == "US":
        if len(raw) != 2:
            raise Unsupported("US is not one value")
        return _U16.unpack(raw)[0]
    if vr in ("UI", "CS", "LO"):
        return _text(raw)
    if not raw.strip(b" "):
        return None  # pydicom's empty IS / DS
    if vr == "IS":
        if not _INT.match(raw):
            raise Unsupported("IS is not one plain integer")
        return int(raw)
    if not _NUMBERS.match(raw):  # DS
        raise Unsupported("DS holds characters pydicom may treat differently")
    try:
        numbers = [float(v) for v in raw.strip(b" ").split(b"\\")]
    except ValueError:
        raise Unsupported("DS does not parse") from None
    return numbers[0] if len(numbers) == 1 else numbers


def _parse(r: _Reader) -> FastHeader:
    if r.read(128, 4) != b"DICM":
        raise Unsupported("no preamble")
    pos, ts = 132, None
    while pos < r.size:  # file meta: explicit VR little endian, group 0002
        if r.read(pos, 2) != b"\x02\x00":
            break
        tag, vr, length, value = _element(r, pos, True)
        if length == UNDEFINED:
            raise Unsupported("undefined length in file meta")
        if tag == TRANSFER_SYNTAX_TAG:
            ts = _text(r.read(value, length))
        pos = value + length
    if not ts or ts in NOT_EXPLICIT_LE:
        raise Unsupported(f"transfer syntax {ts!r}")
    explicit = ts != IMPLICIT_LE
    if not explicit and pos + 6 <= r.size and r.read(pos + 4, 2) in VRS:
        raise Unsupported("explicit VR under an implicit syntax")  # pydicom switches; let it
    values: dict = {}
    pixel_offset = r.size
    while pos < r.size:
        tag, vr, length, value = _element(r, pos, explicit)
        if tag in PIXEL_TAGS:
            pixel_offset = pos
            break
        wanted = WANTED.get(tag)
        if wanted is not None:
            keyword, dict_vr = wanted
            if explicit and vr.decode() != dict_vr:
                raise Unsupported(f"{keyword} has VR {vr!r}")
            if dict_vr == "SQ":
                values[keyword] = True  # presence only: files with these take the pydicom path anyway
            elif length == UNDEFINED:
                raise Unsupported(f"{keyword} of undefined length")
            else:
                values[keyword] = _value(r.read(value, length), dict_vr)
        if length == UNDEFINED:
            pos = _skip_sequence(r, value, explicit and vr != b"UN", 0)
        else:
            pos = value + length
    if pos > r.size:
        raise Unsupported("truncated")
    if values.get("SpecificCharacterSet", "") not in ASCII_CHARSETS:
        raise Unsupported("character set")
    return FastHeader(values, ts, not explicit, pixel_offset)


def parse_header(fp, size: int) -> FastHeader | None:
    """The header of an open DICOM file of `size` bytes, or None where pydicom must read it."""
    try:
        return _parse(_Reader(fp, size))
    except (Unsupported, struct.error, UnicodeDecodeError):
        return None
