"""Scan's fast header reader (ingest.header) against pydicom, on every real file of ../shared/data/dicom and
pydicom's test files, and on truncated and byte-mutated copies of real headers: the inventory row must be
exactly the one the pydicom path gives (or both reject the file with the same reason)."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from _ingest_fixtures import SALT, all_files, pydicom_sources


def _row_or_rejection(path: str, fast: bool):
    from ingest.scan import Rejected, read_header

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read_header(path, SALT, False, fast=fast)
        except Rejected as e:
            return ("rejected", e.reason, e.detail)


def _fast_parsed(path: str) -> bool:
    from ingest.header import parse_header

    with open(path, "rb") as fp:
        return parse_header(fp, os.path.getsize(path)) is not None


def test_fast_header_rows_equal_pydicom_rows_on_every_real_file(dicom_dir):
    files = all_files([str(dicom_dir)] + pydicom_sources())
    mismatches, fast = [], 0
    for path in files:
        reference = _row_or_rejection(path, fast=False)
        got = _row_or_rejection(path, fast=True)
        if got != reference:
            mismatches.append((path, got, reference))
        fast += _fast_parsed(path)
    assert mismatches == []
    assert len(files) >= 300
    assert fast >= 250  # the CT and MR series and most of pydicom's files take the fast reader


def test_fast_header_reads_the_benchmark_series(dicom_dir):
    """The uncompressed CT / MR series (what PACS exports mostly hold) must not fall back to pydicom."""
    for series in ("ct_kits_abdomen_18", "mr_mprage_sagittal_192"):
        files = sorted((dicom_dir / series).glob("*.dcm"))
        assert files and all(_fast_parsed(str(f)) for f in files), series


def test_fast_header_refuses_what_it_does_not_handle_like_pydicom():
    from pydicom.data import get_testdata_file

    assert not _fast_parsed(get_testdata_file("MR_small_bigendian.dcm"))  # big endian: pydicom
    assert not _fast_parsed(get_testdata_file("image_dfl.dcm"))           # deflated: pydicom
    assert not _fast_parsed(get_testdata_file("no_meta.dcm"))             # no preamble: pydicom (force)
    assert _fast_parsed(get_testdata_file("MR_small_implicit.dcm"))
    assert _fast_parsed(get_testdata_file("emri_small_jpeg_ls_lossless.dcm"))  # encapsulated pixel data


@pytest.mark.parametrize("base", ["CT_small.dcm", "MR_small_implicit.dcm", "emri_small_jpeg_ls_lossless.dcm",
                                  "SC_rgb.dcm", "RG1_UNCI.dcm"])
def test_fast_header_on_damaged_headers_matches_pydicom(tmp_path, base):
    """Truncations anywhere in the header and random bytes in it: the fast reader either gives pydicom's
    row or hands the file to pydicom, never a different answer."""
    from pydicom.data import get_testdata_file

    from ingest.header import parse_header

    data = open(get_testdata_file(base), "rb").read()
    with open(get_testdata_file(base), "rb") as fp:
        header_end = parse_header(fp, len(data)).pixel_offset + 12
    rng = np.random.default_rng(sum(map(ord, base)))
    variants = [data[:n] for n in rng.integers(132, header_end, size=12)]
    for _ in range(60):
        mutated = bytearray(data)
        for pos in rng.integers(132, header_end, size=int(rng.integers(1, 4))):
            mutated[pos] = int(rng.integers(0, 256))
        variants.append(bytes(mutated))
    mismatches = []
    for i, blob in enumerate(variants):
        path = tmp_path / f"{i:03d}.dcm"
        path.write_bytes(blob)
        got, reference = _row_or_rejection(str(path), True), _row_or_rejection(str(path), False)
        if got != reference:
            mismatches.append((i, got, reference))
    assert mismatches == []
