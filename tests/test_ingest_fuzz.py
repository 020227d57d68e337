"""A fuzz set made from real files (every codec), truncated and mutated: the job must finish, every file
must be accounted for (a sample or an error row with a reason), every truncated file must be rejected,
and the shards that were written must verify."""
from __future__ import annotations

import io
import subprocess
import warnings

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from _ingest_fixtures import PY, REPO, manifest_rows, readable_error_rows, run_ingest, source_by_hash

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


def _make_fuzz_set(folder):
    rng = np.random.default_rng(1234)
    truncated, mutated = [], []
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
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "noise.dcm").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    truncated += [str(folder / "empty.dcm"), str(folder / "noise.dcm")]
    return truncated, mutated


def test_fuzzed_real_files_never_crash_the_job(tmp_path):
    fuzz = tmp_path / "fuzz"
    fuzz.mkdir()
    truncated, mutated = _make_fuzz_set(fuzz)
    out = tmp_path / "ds"
    summary, stats = run_ingest([fuzz], out, workers=2, shard_size="256KB", modality_map=MODALITY_MAP)
    errors = {e["source"]: e for e in readable_error_rows(out)}
    by_hash = source_by_hash(truncated + mutated)
    ingested = {by_hash[r["source_hash"]] for r in manifest_rows(out)}
    assert stats.files == len(truncated) + len(mutated)
    for f in truncated:
        assert f in errors and f not in ingested, f
        assert errors[f]["reason"] and errors[f]["detail"]
    for f in mutated:
        assert (f in errors) or (f in ingested), f
    # every rejection is classified: no catch-all "conversion failed", no false "changed since scan"
    assert not {e["reason"] for e in errors.values()} & {"conversion failed", "changed since scan"}
    assert len(ingested) >= len(BASES)  # the undamaged-pixel variants still make samples
    assert summary["errors"] == len(errors)
    verify = subprocess.run([PY, "-m", "shards", "verify", str(out)], cwd=REPO, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
