"""Convert's fast path for uncompressed pixel data (ingest.native) against the pydicom path, on every
real file of ../shared/data/dicom and pydicom's test files: identical arrays, pixel-rule outcome,
metadata and sample keys for every frame of every file that gets a native layout; the others are the
documented fallbacks."""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter

import numpy as np
import pytest

from _ingest_fixtures import SALT, all_files, pydicom_sources

UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def _fallback_reason(ds, row) -> str | None:
    """Why ingest.native must refuse this uncompressed file (None: it must accept it)."""
    photometric = row["photometric"]
    if row["pixel_length"] < 0 or row["float_pixels"]:
        return "no defined-length Pixel Data"
    if row["bits_allocated"] not in (8, 16, 32):
        return "bits allocated"
    if row["bits_allocated"] == 8 and row["transfer_syntax"] == "1.2.840.10008.1.2.2":
        return "8-bit big endian"
    if any(k in ds for k in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
                             "ModalityLUTSequence")):
        return "functional groups / modality LUT sequence"
    if not ((row["samples_per_pixel"] == 1 and photometric in ("MONOCHROME1", "MONOCHROME2"))
            or (row["samples_per_pixel"] == 3 and photometric == "RGB" and "PlanarConfiguration" in ds)):
        return "photometric"
    if row["frames"] > 64:
        return "too many frames"
    if row["pixel_length"] < row["declared_bytes"] or row["pixel_end"] > row["size"]:
        return "short or truncated pixel data"
    return None


@pytest.fixture(scope="module")
def compared(dicom_dir):
    import pydicom

    from ingest.convert import convert_frame, fast_frame, load_dataset
    from ingest.native import header_meta
    from ingest.scan import Rejected, read_header
    from shards import sample_key

    files = all_files([str(dicom_dir)] + pydicom_sources())
    kinds, fallbacks, mismatches = Counter(), Counter(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            try:
                row = read_header(path, SALT, False)
            except Rejected:
                continue
            if row["transfer_syntax"] not in UNCOMPRESSED or not row["has_pixels"]:
                assert row["native_layout"] is None, path
                continue
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if row["native_layout"] is None:
                why = _fallback_reason(header, row)
                if why is None:
                    mismatches.append((path, "refused a file that qualifies"))
                fallbacks[why] += 1
                continue
            assert _fallback_reason(header, row) is None, path
            layout = json.loads(row["native_layout"])
            ds = load_dataset(path)
            for frame in range(row["frames"]):
                try:
                    ref, ref_info = convert_frame(ds, frame)
                except Rejected as e:  # both paths must reject the same way
                    with pytest.raises(Rejected) as fast_error:
                        fast_frame(layout, path, frame)
                    assert fast_error.value.reason == e.reason
                    continue
                got, got_info = fast_frame(layout, path, frame)
                if got.dtype != ref.dtype or not np.array_equal(got, ref) or got_info != ref_info:
                    mismatches.append((path, frame, "pixels"))
                if header_meta(ds, frame) != layout["meta"]:
                    mismatches.append((path, frame, "metadata"))
                if sample_key(str(ds.SOPInstanceUID), frame, SALT) != layout["keys"][frame]:
                    mismatches.append((path, frame, "key"))
            kinds[(layout["dtype"], layout["spp"], layout["planar"], layout["shift"] > 0, row["frames"] > 1)] += 1
    return kinds, fallbacks, mismatches


def test_fast_path_equals_pydicom_path_on_every_uncompressed_file(compared):
    kinds, _, mismatches = compared
    assert mismatches == []
    assert sum(kinds.values()) >= 250  # the CT and MR series and most of pydicom's uncompressed files


def test_fast_path_covers_the_odd_layouts(compared):
    kinds, _, _ = compared
    dtypes = {k[0] for k in kinds}
    assert {"<u1", "<u2", "<i2", "<u4", ">u2", ">i2", ">u4"} <= dtypes  # 8/16/32-bit, both byte orders
    assert any(k[3] and k[0].endswith("i2") for k in kinds)              # signed, BitsStored < BitsAllocated
    assert any(k[3] and k[0].endswith("u2") for k in kinds)              # unsigned, masked high bits
    assert any(k[1] == 3 and k[2] == 0 for k in kinds) and any(k[1] == 3 and k[2] == 1 for k in kinds)  # RGB
    assert any(k[4] for k in kinds)                                      # multi-frame


def test_unusual_files_fall_back_to_pydicom(compared):
    _, fallbacks, _ = compared
    assert fallbacks["bits allocated"] >= 1        # 1-bit
    assert fallbacks["8-bit big endian"] >= 1      # pydicom byte-swaps OW
    assert fallbacks["photometric"] >= 1           # palette colour, YBR_FULL
    assert fallbacks["functional groups / modality LUT sequence"] >= 1  # enhanced multi-frame
    assert fallbacks["short or truncated pixel data"] >= 1


def test_a_file_replaced_after_the_scan_takes_the_pydicom_path(tmp_path, dicom_dir):
    from ingest.native import Changed
    from ingest.convert import fast_frame
    from ingest.scan import read_header

    src = sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))[0]
    copy = tmp_path / "slice.dcm"
    copy.write_bytes(src.read_bytes())
    layout = json.loads(read_header(str(copy), SALT, False)["native_layout"])
    copy.write_bytes(src.read_bytes()[:-2])  # truncated, then same mtime: size still differs
    os.utime(copy, ns=(layout["mtime_ns"], layout["mtime_ns"]))
    with pytest.raises(Changed):
        fast_frame(layout, str(copy), 0)
