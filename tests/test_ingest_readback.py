"""An ingested (and labelled) dataset read back by DALI with our .idx files and by webdataset: both must
give back exactly the manifest; `shards verify` must pass, then catch a flipped byte."""
from __future__ import annotations

import zlib
import json
import math
import shutil
import subprocess

import numpy as np
import pytest

from _ingest_fixtures import PY, REPO, SALT, manifest_rows, run_ingest


def _crc(data: bytes) -> int:
    return zlib.crc32(data)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, dicom_dir):
    import pydicom

    tmp = tmp_path_factory.mktemp("labelled")
    ct_series = pydicom.dcmread(next((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm")), stop_before_pixels=True)
    mr_series = pydicom.dcmread(next((dicom_dir / "mr_mprage_sagittal_192").glob("*.dcm")), stop_before_pixels=True)
    labels = tmp / "labels.csv"
    labels.write_text("SeriesInstanceUID,tumour,score\n"
                      f"{ct_series.SeriesInstanceUID},1,0.25\n"
                      f"{mr_series.SeriesInstanceUID},0,\n"
                      "1.2.3.4.5.6.7.8.9,1,1\n")  # a series that is not in the sources: ignored
    out = tmp / "ds"
    sources = [dicom_dir / "ct_kits_abdomen_18", dicom_dir / "mr_mprage_sagittal_192", dicom_dir / "mr_transfer_syntaxes"]
    summary, _ = run_ingest(sources, out, labels=str(labels), shard_size="3MB")
    return {"root": out, "summary": summary, "ct": ct_series, "mr": mr_series}


def test_labels_are_joined_by_series(labelled):
    from shards import salted_hash

    rows = manifest_rows(labelled["root"])
    ct_hash = salted_hash(labelled["ct"].SeriesInstanceUID, SALT)
    mr_hash = salted_hash(labelled["mr"].SeriesInstanceUID, SALT)
    assert labelled["summary"]["label_names"] == ["tumour", "score"]
    by_series = {}
    for r in rows:
        by_series.setdefault(r["series_hash"], []).append(r)
    assert len(by_series[ct_hash]) == 18 and len(by_series[mr_hash]) == 192
    assert all(r["labelled"] and json.loads(r["labels"]) == {"tumour": 1.0, "score": 0.25} for r in by_series[ct_hash])
    assert all(r["labelled"] and json.loads(r["labels"]) == {"tumour": 0.0} for r in by_series[mr_hash])
    others = [r for r in rows if r["series_hash"] not in (ct_hash, mr_hash)]
    assert len(others) == 9 and not any(r["labelled"] for r in others)
    assert labelled["summary"]["modalities"]["ct"]["labelled"] == 18


def test_dali_reader_with_our_index_matches_manifest(labelled):
    from nvidia.dali import fn, pipeline_def
    from shards import Dataset

    ds = Dataset(labelled["root"])
    for modality in ds.modalities:
        shard_files = ds.shards(modality)
        rows = sorted(manifest_rows(labelled["root"]), key=lambda r: (r["shard"], r["index"]))
        rows = [r for r in rows if r["modality"] == modality]

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe():
            meta, labels, npy = fn.readers.webdataset(
                paths=[str(s.tar) for s in shard_files], index_paths=[str(s.idx) for s in shard_files],
                ext=["json", "labels.npy", "npy"], random_shuffle=False)
            return meta, labels, npy

        p = pipe()
        p.build()
        for row in rows:
            meta, labels, npy = (bytes(np.array(o[0])) for o in p.run())
            assert _crc(npy) == row["npy_crc32"] and _crc(meta) == row["json_crc32"]
            assert json.loads(meta)["sop_hash"] == row["sop_hash"]
            vector = np.load(__import__("io").BytesIO(labels))
            finite = {k: float(v) for k, v in zip(["tumour", "score"], vector) if math.isfinite(v)}
            assert finite == (json.loads(row["labels"]) if row["labels"] else {})


def test_webdataset_reader_matches_manifest(labelled):
    import webdataset as wds
    from shards import Dataset

    ds = Dataset(labelled["root"])
    rows = {r["key"]: r for r in manifest_rows(labelled["root"])}
    seen = []
    for modality in ds.modalities:
        urls = [str(s.tar) for s in ds.shards(modality)]
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            row = rows[sample["__key__"]]
            assert _crc(sample["npy"]) == row["npy_crc32"] and _crc(sample["json"]) == row["json_crc32"]
            assert row["modality"] == modality
            seen.append(sample["__key__"])
    assert sorted(seen) == sorted(rows)


def test_verify_passes_then_catches_a_flipped_byte(labelled, tmp_path):
    ok = subprocess.run([PY, "-m", "shards", "verify", str(labelled["root"])], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    copy = tmp_path / "copy"
    shutil.copytree(labelled["root"], copy)
    row = manifest_rows(copy)[5]
    tar = copy / "shards" / row["modality"] / f"{row['shard']}.tar"
    data = bytearray(tar.read_bytes())
    data[row["npy_offset"] + row["npy_size"] // 2] ^= 0x01  # one bit of one pixel
    tar.write_bytes(bytes(data))
    bad = subprocess.run([PY, "-m", "shards", "verify", str(copy)], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0
    assert row["shard"] in bad.stdout + bad.stderr
