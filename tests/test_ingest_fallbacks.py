"""What stands in when the first choice fails, so that every decodable slice lands: the next copy of
the same SOP instance when a copy fails to decode, the frames a better copy lacks when copies have
different frame counts, and GDCM when pydicom's other decoders cannot read a codestream."""
from __future__ import annotations

import shutil
from collections import defaultdict

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from _ingest_fixtures import SALT, expected_stored, readable_error_rows, manifest_rows, reference_frames, run_ingest

J2K_10_FRAMES = "emri_small_jpeg_2k_lossless.dcm"   # MR, 10 frames, JPEG 2000 lossless
PALETTE_1_FRAME = "OBXXXX1A.dcm"                     # US palette colour, 1 frame ...
PALETTE_2_FRAMES = "OBXXXX1A_2frame.dcm"             # ... and the same SOP instance with 2 frames
JPEG_12BIT_DAMAGED = "JPEG-lossy.dcm"   # JPEG Extended 12-bit that libjpeg rejects (misplaced marker) ...
JPEG_12BIT_REPAIRED = "JPGExtended.dcm"  # ... and the same image with a repaired codestream
CT_J2K = "693_J2KR.dcm"  # the only CT: damaged without a duplicate, its shard has no sample to commit


def _damage_codestreams(path, frames: int) -> None:
    """Overwrite the JPEG 2000 start-of-codestream marker of every frame: no decoder can read them."""
    data = path.read_bytes()
    marker = b"\xff\x4f\xff\x51"
    assert data.count(marker) == frames
    path.write_bytes(data.replace(marker, b"\0\0\0\0"))


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    src = tmp_path_factory.mktemp("copies")
    files = {}
    for folder, name in (("a", J2K_10_FRAMES), ("b", J2K_10_FRAMES), ("c", J2K_10_FRAMES),
                         ("d", PALETTE_1_FRAME), ("e", PALETTE_2_FRAMES), ("f", JPEG_12BIT_DAMAGED),
                         ("g", CT_J2K)):
        (src / folder).mkdir()
        files[folder] = src / folder / name
        shutil.copyfile(get_testdata_file(name), files[folder])
    _damage_codestreams(files["a"], 10)  # a wins the ranking (same syntax, smallest path) but is broken
    _damage_codestreams(files["g"], 1)
    out = tmp_path_factory.mktemp("dedup") / "ds"
    summary, stats = run_ingest([src], out, modality_map={"NM": "xr"})  # the JPEG 12-bit files are NM
    return {"files": {k: str(v) for k, v in files.items()}, "manifest": manifest_rows(out), "errors": readable_error_rows(out),
            "root": out, "summary": summary, "stats": stats}


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
    # the copy used is named as errors/ name sources (hashed by default); the map beside resolves it
    from ingest.paths import resolve

    used = failed["detail"].rsplit("fallback used: duplicate copy ", 1)[1]
    assert used.startswith("sha:") and resolve(copies["root"], [used]) == {used[4:]: files["b"]}
    # the copy that was not needed stays a duplicate
    assert (errors[files["c"]]["stage"], errors[files["c"]]["reason"]) == ("plan", "duplicate SOPInstanceUID")


def test_copies_with_different_frame_counts_are_deduplicated_per_frame(copies):
    files, by_source = copies["files"], _by_source(copies["manifest"], copies["files"])
    # frame 0 from the better-ranked 1-frame copy, frame 1 only exists in the 2-frame copy
    assert sorted(by_source["d"]) == [0] and sorted(by_source["e"]) == [1]
    _assert_pixels(copies["root"], by_source["d"], files["d"])
    _assert_pixels(copies["root"], by_source["e"], files["e"])
    keys = [r["key"] for r in copies["manifest"]]
    assert len(keys) == len(set(keys))
    assert not {files["d"], files["e"]} & {e["source"] for e in copies["errors"]}


def _gdcm_reader(path):
    import pydicom

    from ingest.decoders import gdcm_whole_file, release_decoded

    try:
        return gdcm_whole_file(pydicom.dcmread(path))
    finally:
        release_decoded()


def test_jpeg_extended_12bit_that_libjpeg_rejects_lands_through_gdcm(copies):
    import pydicom
    from pydicom.pixels import pixel_array

    rows = _by_source(copies["manifest"], copies["files"])["f"]
    assert sorted(rows) == [0] and rows[0]["modality"] == "xr"
    assert copies["files"]["f"] not in {e["source"] for e in copies["errors"]}
    from shards.reader import iter_samples

    stored = {key: pixels for key, pixels, _, _ in iter_samples(copies["root"])}[rows[0]["key"]]
    assert np.array_equal(stored, _gdcm_reader(copies["files"]["f"])[0])
    # the same image decoded by libjpeg from the repaired file: equal up to IDCT rounding
    repaired = pixel_array(pydicom.dcmread(get_testdata_file(JPEG_12BIT_REPAIRED)), decoding_plugin="pylibjpeg")
    diff = np.abs(stored.astype(np.int64) - repaired)
    assert stored.shape == repaired.shape == (1024, 256) and diff.max() <= 1 and (diff == 0).mean() > 0.9


def test_gdcm_runs_only_after_the_other_decoders_failed():
    import pydicom
    from pydicom.pixels import pixel_array

    from ingest.decoders import decode

    path = get_testdata_file(JPEG_12BIT_REPAIRED)  # libjpeg reads it; GDCM's result differs by rounding
    ds = pydicom.dcmread(path)
    first_choice = pixel_array(ds, decoding_plugin="pylibjpeg")
    by_gdcm = _gdcm_reader(path)[0]
    assert not np.array_equal(first_choice, by_gdcm)
    assert np.array_equal(decode(ds, 0), first_choice)
    damaged = pydicom.dcmread(get_testdata_file(JPEG_12BIT_DAMAGED))
    with pytest.raises(Exception):
        pixel_array(damaged, decoding_plugin="pylibjpeg")
    assert np.array_equal(decode(damaged, 0), by_gdcm)


LOSSLESS_SYNTAXES = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
                     "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201"}


def test_gdcm_and_libjpeg_decode_lossless_files_identically():
    """Where both decoders read a lossless codestream of the demo corpus, every pixel is equal."""
    import warnings

    import pydicom
    from pydicom.pixels import pixel_array

    from _ingest_fixtures import all_files, pydicom_sources

    compared = 0
    for path in all_files(pydicom_sources()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
            except Exception:
                continue
            if str(ds.file_meta.get("TransferSyntaxUID", "")) not in LOSSLESS_SYNTAXES or "PixelData" not in ds:
                continue
            try:
                ours, theirs = (pixel_array(ds, decoding_plugin=p) for p in ("pylibjpeg", "gdcm"))
            except Exception:
                continue  # a file one of them cannot read (broken on purpose, or unsupported)
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), path
        compared += 1
    assert compared >= 15


def test_report_counts_only_committed_shards(copies):
    from dataclasses import asdict

    from ingest.finalize import report

    committed = {r["shard"] for r in copies["manifest"]}
    assert "ct" not in {r["modality"] for r in copies["manifest"]}  # the CT shard had nothing to commit
    assert copies["stats"].shards_written == len(committed) == 3  # mr, us, xr
    assert f"{len(committed)} shards written" in report(copies["summary"], asdict(copies["stats"]))
