"""Non-DICOM sources (MedMNIST .npz, PNG/TIFF folders, NIfTI volumes) become datasets whose pixels and
labels match the source exactly."""
from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image

import shards
from shards.verify import verify
from ingest.config import IngestConfig

from _ingest_fixtures import readable_error_rows

SALT = "arrays-test-salt"


def _ingest(tmp_path, sources, modality, **kw):
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "ingest", *map(str, sources), "--out", str(out), "--modality", modality,
           "--workers", "1", "--no-progress", "--salt", SALT, "--shard-size", "256KB"]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def _by_source(dataset):
    """{(source path, locator): (pixels, labels, split)} via the sample's key."""
    return {key: (pixels, labels, meta["split"]) for key, pixels, meta, labels in shards.reader.iter_samples(dataset)}


def test_medmnist_npz_keeps_pixels_labels_and_splits(tmp_path, medmnist_dir):
    src = medmnist_dir / "breastmnist.npz"
    out = _ingest(tmp_path, [src], "us")
    raw = np.load(src)
    info = shards.Dataset(out).info
    assert info["label_names"] == ["label"]
    assert info["modalities"]["us"]["train"] == 546 and info["modalities"]["us"]["val"] == 78
    assert info["modalities"]["us"]["test"] == 156
    got = _by_source(out)
    for split in ("train", "val", "test"):
        for i in range(len(raw[f"{split}_images"])):
            pixels, labels, stored_split = got[shards.sample_key(f"{src}#{split}/{i}", 0, SALT)]
            assert stored_split == split and pixels.dtype == np.uint8
            assert np.array_equal(pixels, raw[f"{split}_images"][i])
            assert labels.tolist() == [float(raw[f"{split}_labels"][i, 0])]
    assert verify(out).ok
    # Shards mix images across the archive (shuffled), and a rerun adds nothing.
    first = shards.Dataset(out).shards("us")[0]
    assert first.samples < 780
    again = _ingest(tmp_path, [src], "us")
    assert shards.Dataset(again).manifest().num_rows == 780


def test_png_and_tiff_folder_with_labels(tmp_path, medmnist_dir, dicom_dir):
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    raw = np.load(medmnist_dir / "pneumoniamnist.npz")
    expected, rows = {}, []
    for i in range(6):  # 8-bit PNG
        name = f"a/xr_{i}.png"
        Image.fromarray(raw["train_images"][i]).save(folder / name)
        expected[name] = raw["train_images"][i]
        rows.append({"path": name, "pneumonia": int(raw["train_labels"][i, 0])})
    for i, path in enumerate(sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))[:3]):  # 16-bit PNG and TIFF
        ct = pydicom.dcmread(path).pixel_array.astype(np.uint16)
        name = f"ct_{i}.png" if i < 2 else f"ct_{i}.tif"
        Image.fromarray(ct).save(folder / name)
        expected[name] = ct
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "pneumonia"])
        w.writeheader()
        w.writerows(rows)
    out = _ingest(tmp_path, [folder], "xr", labels=tmp_path / "labels.csv")
    got = _by_source(out)
    assert len(got) == len(expected)
    labels_by_name = {r["path"]: r["pneumonia"] for r in rows}
    for name, pixels in expected.items():
        stored, labels, _ = got[shards.sample_key(f"{folder / name}#", 0, SALT)]
        assert stored.dtype == pixels.dtype and np.array_equal(stored, pixels)
        if name in labels_by_name:
            assert labels.tolist() == [labels_by_name[name]]
        else:
            assert np.isnan(labels).all()


def test_nifti_volume_becomes_its_slices(tmp_path, dicom_dir):
    import SimpleITK as sitk

    files = sorted((dicom_dir / "mr_mprage_sagittal_192").glob("*.dcm"))[:12]
    volume = np.stack([pydicom.dcmread(f).pixel_array for f in files]).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / "brain.nii.gz"))
    out = _ingest(tmp_path, [tmp_path / "brain.nii.gz"], "mr")
    got = _by_source(out)
    assert len(got) == 12
    for z in range(12):
        pixels, _, split = got[shards.sample_key(f"{tmp_path / 'brain.nii.gz'}#z/{z}", 0, SALT)]
        assert np.array_equal(pixels, volume[z]) and pixels.dtype == np.int16
    assert len({s for _, _, s in got.values()}) == 1  # one volume = one patient = one split


def test_bad_sources_are_recorded_and_the_job_goes_on(tmp_path, medmnist_dir):
    raw = dict(np.load(medmnist_dir / "breastmnist.npz"))
    raw["val_labels"] = raw["val_labels"][:-1]
    np.savez(tmp_path / "mismatched.npz", **raw)
    (tmp_path / "notes.txt").write_text("not an image")
    good = tmp_path / "good.npy"
    np.save(good, raw["test_images"][:5])
    out = _ingest(tmp_path, [tmp_path / "mismatched.npz", tmp_path / "notes.txt", good], "us")
    errors = readable_error_rows(out)  # hashed inside the dataset: read through the map beside it
    details = {e["source"]: e["detail"] for e in errors}
    assert "78 val images but 77 labels" in details[str(tmp_path / "mismatched.npz")]
    assert str(tmp_path / "notes.txt") in details
    assert shards.Dataset(out).manifest().num_rows == 5
