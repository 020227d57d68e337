"""Memory bounds: what a header declares (or a codestream claims) cannot make a worker allocate beyond the
decoded size the header declares, which plan bounds by max_pixel_bytes; implausible frame counts are
rejected at scan, before planning."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import warnings

import pydicom
import pytest
from pydicom.data import get_testdata_file

from _ingest_fixtures import PY, REPO, SALT

J2K_CT = "693_J2KR.dcm"  # CT 512 x 512, 16 bits, JPEG 2000 lossless, one frame
CLAIMED_SIDE = 12000     # 144 M samples: ~0.8 GB peak in pylibjpeg for a 0.5 MB frame

_PEAK = """
import json, resource, sys, warnings
warnings.simplefilter("ignore")
from ingest.convert import convert_frame, load_dataset
from ingest.scan import Rejected
ds = load_dataset(sys.argv[1])
try:
    convert_frame(ds, 0)
    reason = None
except Rejected as e:
    reason = e.reason
print(json.dumps({"reason": reason, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _convert_peak(path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([PY, "-c", _PEAK, str(path)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_codestream_claiming_more_pixels_than_the_header_costs_no_more_memory(tmp_path):
    data = bytearray(open(get_testdata_file(J2K_CT), "rb").read())
    siz = data.find(b"\xff\x4f\xff\x51") + 2  # SIZ: Xsiz, Ysiz at +6, tile size XTsiz, YTsiz at +22
    assert struct.unpack(">II", data[siz + 6:siz + 14]) == (512, 512)
    data[siz + 6:siz + 14] = struct.pack(">II", CLAIMED_SIDE, CLAIMED_SIDE)
    data[siz + 22:siz + 30] = struct.pack(">II", CLAIMED_SIDE, CLAIMED_SIDE)
    claiming = tmp_path / "claims_12000.dcm"
    claiming.write_bytes(bytes(data))
    honest = _convert_peak(get_testdata_file(J2K_CT))
    bomb = _convert_peak(claiming)
    # the honest frame decodes to 0.5 MB; the claimed one is 288 MB of 16-bit samples (~0.8 GB peak)
    assert bomb["peak_kb"] - honest["peak_kb"] < 32 * 1024
    assert honest["reason"] is None
    assert bomb["reason"] == "codestream larger than header"


def _with_frames(name: str, frames: int, modality: str) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file(name))
    ds.NumberOfFrames = frames
    ds.Modality = modality
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _plan_one(path, max_pixel_bytes: int):
    import pyarrow as pa

    from ingest.plan import make_plan
    from ingest.scan import INVENTORY_SCHEMA, read_header

    row = read_header(str(path), SALT, False)
    inventory = pa.Table.from_pylist([row], schema=INVENTORY_SCHEMA).append_column("path", pa.array([str(path)]))
    plan, _ = make_plan(inventory, generation=0, modality_map={}, max_pixel_bytes=max_pixel_bytes, max_side=None,
                        shard_size=1 << 30, frames_per_unit=16, val_fraction=0.0, seed=0, previous=set())
    return plan


def test_a_file_larger_than_the_budget_is_rejected_before_decoding(tmp_path):
    """A 128 x 128 CT (32 KB declared) whose Pixel Data carries 4 MB of excess bytes: pydicom would read
    all of them, so the file counts against max_pixel_bytes even though its declared size is small."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = ds.PixelData + bytes(4 << 20)
    path = tmp_path / "padded.dcm"
    ds.save_as(path)
    plan = _plan_one(path, max_pixel_bytes=1 << 20)
    assert plan.slices == 0 and [e["reason"] for e in plan.errors] == ["file above limit"]
    assert _plan_one(get_testdata_file("CT_small.dcm"), max_pixel_bytes=1 << 20).slices == 1


def test_a_million_declared_frames_over_one_fragment_are_rejected_at_scan(tmp_path):
    from ingest.scan import Rejected, read_header

    # a real 3 x 3 JPEG whose header now claims 1,000,000 frames: 27 MB declared, under any budget
    path = tmp_path / "million.dcm"
    path.write_bytes(_with_frames("SC_rgb_small_odd_jpeg.dcm", 1_000_000, "US"))
    with pytest.raises(Rejected) as e:
        read_header(str(path), SALT, False)
    assert e.value.reason == "implausible frame count" and "1,000,000" in e.value.detail
    # the same file with its true frame count is scanned and planned as one slice
    path.write_bytes(_with_frames("SC_rgb_small_odd_jpeg.dcm", 1, "US"))
    plan = _plan_one(path, max_pixel_bytes=1 << 31)
    assert plan.slices == 1 and not plan.errors
