"""A fuzz set made from real files (every codec), truncated and mutated: the job must finish, every file
must be accounted for (a sample or an error row with a reason), every truncated file must be rejected,
and the shards that were written must verify. The structure-aware mutants of `benchmarks.fuzz` also
check that its in-process classifier (which the long fuzz runs rely on) says what the real job does."""
from __future__ import annotations

import io
import struct
import subprocess
import warnings
from pathlib import Path

from collections import Counter

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_fragments
from pydicom.uid import generate_uid

from _ingest_fixtures import PY, REPO, manifest_rows, readable_error_rows, run_ingest, source_by_hash
from benchmarks.fuzz import FUZZ_MAX_PIXEL_BYTES, classify, mutate

BASES = [
    "CT_small.dcm",                      # explicit VR little endian, int16
    "MR_small_bigendian.dcm",            # explicit VR big endian
    "MR_small_RLE.dcm",                  # RLE
    "emri_small_jpeg_ls_lossless.dcm",   # JPEG-LS, 10 frames
    "MR_small_jp2klossless.dcm",         # JPEG 2000
    "SC_rgb_jpeg_dcmtk.dcm",             # JPEG baseline, YBR
    "JPGLosslessP14SV1_1s_1f_8b.dcm",    # JPEG lossless
    "OBXXXX1A_rle.dcm",                  # palette colour, RLE
]
MODALITY_MAP = {"OT": "xr"}  # let secondary captures through so their decoding is exercised too
STRUCTURAL_PER_BASE = 4


def _fresh(path: str, tag: str) -> bytes:
    """The real file with a fresh SOP instance UID (so no variant is dropped as a duplicate)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
    uid = generate_uid(entropy_srcs=[path, tag])
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def overlong_rle(name: str = "MR_small_RLE.dcm") -> bytes:
    """A real RLE file whose first segment's first replicate run is made 128 bytes long: the segment
    then decodes to more bytes than the frame holds (pylibjpeg-rle panics on this, found by the fuzzer)."""
    path = get_testdata_file(name)
    raw = bytearray(Path(path).read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
    frame = list(generate_fragments(ds.PixelData))[-1]
    start = raw.find(frame)
    _, *offsets = struct.unpack("<16I", frame[:64])
    pos, end = start + offsets[0], start + offsets[1]
    while raw[pos] <= 128:  # literal runs (n + 1 bytes follow) and no-ops, up to the first replicate run
        pos += raw[pos] + 2 if raw[pos] < 128 else 1
    assert pos < end
    raw[pos] = 129  # replicate the next byte 128 times
    return bytes(raw)


def test_decoder_panic_on_damaged_rle_is_a_rejection(tmp_path):
    from ingest.convert import decode_frame, load_dataset
    from ingest.scan import Rejected

    f = tmp_path / "overlong.dcm"
    f.write_bytes(overlong_rle())
    with pytest.raises(Rejected) as caught:  # was pyo3's PanicException, which ended the convert task
        decode_frame(load_dataset(str(f)), 0)
    assert caught.value.reason == "pixel decoding failed"
    assert "panic" in caught.value.detail


def manufacturer_as_fd(name: str = "CT_small.dcm") -> bytes:
    """A real file (fresh UID) whose Manufacturer (0008,0070) says VR FD instead of LO: its 18 bytes of text
    are not a whole number of doubles, so pydicom raises when convert first reads the value (fuzzer finding)."""
    raw = _fresh(get_testdata_file(name), "manufacturer-fd")
    header = b"\x08\x00\x70\x00LO"
    assert raw.count(header) == 1
    return raw.replace(header, b"\x08\x00\x70\x00FD")


def test_value_that_does_not_fit_its_vr_is_a_rejection(tmp_path):
    from ingest.convert import convert_frame, load_dataset
    from ingest.scan import Rejected

    f = tmp_path / "manufacturer-fd.dcm"
    f.write_bytes(manufacturer_as_fd())
    with pytest.raises(Rejected) as caught:  # was pydicom's BytesLengthException: "conversion failed"
        convert_frame(load_dataset(str(f)), 0)
    assert caught.value.reason == "bad header value"
    assert caught.value.detail == "BytesLengthException parsing (0008,0070) according to VR 'FD'"
    assert "GE MEDICAL" not in caught.value.detail  # values never reach error rows: they may be names


def jpeg_with_wrong_bits() -> bytes:
    """A real 8-bit JPEG (fresh UID) whose header says BitsAllocated 32: the codestream disagrees with the
    header. pylibjpeg raises; python-gdcm, where installed, aborted the process (fuzzer finding)."""
    raw = _fresh(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"), "bits-32")
    element = b"\x28\x00\x00\x01US\x02\x00"  # (0028,0100) US, length 2
    assert raw.count(element + b"\x08\x00") == 1
    return raw.replace(element + b"\x08\x00", element + b"\x20\x00")


def test_codestream_that_disagrees_with_the_header_is_rejected_not_aborted(tmp_path):
    pytest.importorskip("gdcm", reason="the abort came from python-gdcm, not installed here")
    f = tmp_path / "bits-32.dcm"
    f.write_bytes(jpeg_with_wrong_bits())
    code = ("import sys; from ingest.convert import decode_frame, load_dataset; from ingest.scan import Rejected\n"
            "try:\n    decode_frame(load_dataset(sys.argv[1]), 0)\n"
            "except Rejected as e:\n    print(e.reason)\n")
    # in a child: before the fix gdcm's uncaught C++ exception aborted it (SIGABRT)
    done = subprocess.run([PY, "-c", code, str(f)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-500:])
    assert done.stdout.strip() == "pixel decoding failed"


def _make_fuzz_set(folder):
    rng = np.random.default_rng(1234)
    truncated, mutated, structural = [], [], []
    for base in BASES:
        path = get_testdata_file(base)
        stem = base.rsplit(".", 1)[0]
        for frac in (0.05, 0.4, 0.8, 0.97):
            data = _fresh(path, f"trunc{frac}")
            f = folder / f"{stem}-trunc{int(frac * 100):02d}.dcm"
            f.write_bytes(data[: int(len(data) * frac)])
            truncated.append(str(f))
        for i in range(4):
            data = bytearray(_fresh(path, f"mut{i}"))
            start = 0 if i % 2 == 0 else len(data) // 2  # header-side or pixel-side damage
            for pos in rng.integers(start, len(data), size=16):
                data[pos] = int(rng.integers(0, 256))
            f = folder / f"{stem}-mut{i}.dcm"
            f.write_bytes(bytes(data))
            mutated.append(str(f))
        f = folder / f"{stem}-nopreamble.dcm"
        f.write_bytes(_fresh(path, "nopreamble")[132:])  # no preamble / DICM: read with force
        mutated.append(str(f))
        for i in range(STRUCTURAL_PER_BASE):  # lengths, VRs, nested sequences, fragments ... (benchmarks.fuzz)
            data, _ = mutate(_fresh(path, f"struct{i}"), np.random.default_rng([1234, len(structural)]))
            f = folder / f"{stem}-struct{i}.dcm"
            f.write_bytes(data)
            structural.append(str(f))
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "noise.dcm").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (folder / "overlong-rle.dcm").write_bytes(overlong_rle())
    (folder / "manufacturer-fd.dcm").write_bytes(manufacturer_as_fd())
    (folder / "bits-32.dcm").write_bytes(jpeg_with_wrong_bits())
    truncated += [str(folder / "empty.dcm"), str(folder / "noise.dcm")]
    return truncated, mutated, structural


def test_fuzzed_real_files_never_crash_the_job(tmp_path):
    fuzz = tmp_path / "fuzz"
    fuzz.mkdir()
    truncated, mutated, structural = _make_fuzz_set(fuzz)
    panic, bad_vr, bad_bits = (str(fuzz / n) for n in ("overlong-rle.dcm", "manufacturer-fd.dcm", "bits-32.dcm"))
    out = tmp_path / "ds"
    summary, stats = run_ingest([fuzz], out, workers=2, shard_size="256KB", modality_map=MODALITY_MAP,
                                max_pixel_bytes=FUZZ_MAX_PIXEL_BYTES)
    errors = {e["source"]: e for e in readable_error_rows(out)}
    by_hash = source_by_hash(truncated + mutated + structural + [panic, bad_vr, bad_bits])
    ingested = {by_hash[r["source_hash"]] for r in manifest_rows(out)}
    assert stats.files == len(truncated) + len(mutated) + len(structural) + 3
    for f in truncated:
        assert f in errors and f not in ingested, f
        assert errors[f]["reason"] and errors[f]["detail"]
    for f in mutated:
        assert (f in errors) or (f in ingested), f
    assert errors[panic]["reason"] == "pixel decoding failed" and panic not in ingested
    assert errors[bad_vr]["reason"] == "bad header value" and bad_vr not in ingested
    assert errors[bad_bits]["reason"] == "pixel decoding failed" and bad_bits not in ingested
    outcomes = Counter()
    for f in structural:  # the fuzzer's classifier agrees with the job, file by file
        outcome, reason, detail = classify(f, FUZZ_MAX_PIXEL_BYTES)
        outcomes[outcome] += 1
        if outcome == "accepted":
            assert f in ingested and f not in errors, (f, errors.get(f))
        else:
            assert outcome == "rejected", (f, reason, detail)
            assert f in errors and f not in ingested, (f, reason)
            assert f"{errors[f]['stage']}: {errors[f]['reason']}" == reason, (f, errors[f], reason)
    assert outcomes["accepted"] and outcomes["rejected"]  # both sides of the comparison are exercised
    # every rejection is classified: no catch-all "conversion failed", no false "changed since scan"
    assert not {e["reason"] for e in errors.values()} & {"conversion failed", "changed since scan"}
    assert len(ingested) >= len(BASES)  # the undamaged-pixel variants still make samples
    assert summary["errors"] == len(errors)
    verify = subprocess.run([PY, "-m", "shards", "verify", str(out)], cwd=REPO, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
