"""Deduplication keeps every decodable slice: a copy that fails to decode is replaced by the next copy
of the same SOP instance, and copies with different frame counts are deduplicated per frame."""
from __future__ import annotations

import shutil
from collections import defaultdict

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from _ingest_fixtures import SALT, error_rows, expected_stored, manifest_rows, reference_frames, run_ingest

J2K_10_FRAMES = "emri_small_jpeg_2k_lossless.dcm"   # MR, 10 frames, JPEG 2000 lossless
PALETTE_1_FRAME = "OBXXXX1A.dcm"                     # US palette colour, 1 frame ...
PALETTE_2_FRAMES = "OBXXXX1A_2frame.dcm"             # ... and the same SOP instance with 2 frames


def _damage_codestreams(path) -> None:
    """Overwrite the JPEG 2000 start-of-codestream marker of every frame: no decoder can read them."""
    data = path.read_bytes()
    marker = b"\xff\x4f\xff\x51"
    assert data.count(marker) == 10
    path.write_bytes(data.replace(marker, b"\0\0\0\0"))


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    src = tmp_path_factory.mktemp("copies")
    files = {}
    for folder, name in (("a", J2K_10_FRAMES), ("b", J2K_10_FRAMES), ("c", J2K_10_FRAMES),
                         ("d", PALETTE_1_FRAME), ("e", PALETTE_2_FRAMES)):
        (src / folder).mkdir()
        files[folder] = src / folder / name
        shutil.copyfile(get_testdata_file(name), files[folder])
    _damage_codestreams(files["a"])  # a wins the ranking (same syntax, smallest path) but is broken
    out = tmp_path_factory.mktemp("dedup") / "ds"
    run_ingest([src], out)
    return {"files": {k: str(v) for k, v in files.items()}, "manifest": manifest_rows(out), "errors": error_rows(out),
            "root": out}


def _by_source(rows, files):
    from shards import salted_hash

    name_of = {salted_hash(path, SALT): k for k, path in files.items()}
    out = defaultdict(dict)
    for r in rows:
        out[name_of[r["source_hash"]]][r["frame"]] = r
    return out


def _assert_pixels(root, rows_by_frame, path):
    from shards.reader import iter_samples

    samples = {key: (pixels, meta) for key, pixels, meta, _ in iter_samples(root)}
    ds, frames = reference_frames(path)
    for frame, row in rows_by_frame.items():
        pixels, meta = samples[row["key"]]
        assert np.array_equal(pixels.astype(np.int64), expected_stored(ds, frames[frame], meta)), (path, frame)


def test_copy_that_fails_to_decode_is_replaced_by_its_duplicate(copies):
    files, by_source = copies["files"], _by_source(copies["manifest"], copies["files"])
    # every frame lands once, from b: the first copy that decodes
    assert "a" not in by_source and "c" not in by_source
    assert sorted(by_source["b"]) == list(range(10))
    _assert_pixels(copies["root"], by_source["b"], files["b"])
    errors = {e["source"]: e for e in copies["errors"]}
    failed = errors[files["a"]]
    assert (failed["stage"], failed["reason"]) == ("convert", "pixel decoding failed")
    assert failed["detail"].endswith(f"fallback used: duplicate copy {files['b']}")
    # the copy that was not needed stays a duplicate
    assert (errors[files["c"]]["stage"], errors[files["c"]]["reason"]) == ("plan", "duplicate SOPInstanceUID")


def test_copies_with_different_frame_counts_are_deduplicated_per_frame(copies):
    files, by_source = copies["files"], _by_source(copies["manifest"], copies["files"])
    # frame 0 from the better-ranked 1-frame copy, frame 1 only exists in the 2-frame copy
    assert sorted(by_source["d"]) == [0] and sorted(by_source["e"]) == [1]
    _assert_pixels(copies["root"], by_source["d"], files["d"])
    _assert_pixels(copies["root"], by_source["e"], files["e"])
    keys = [r["key"] for r in copies["manifest"]]
    assert len(keys) == len(set(keys)) == 12
    assert not {files["d"], files["e"]} & {e["source"] for e in copies["errors"]}
