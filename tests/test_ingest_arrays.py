"""Non-DICOM sources (MedMNIST .npz, PNG/TIFF folders, NIfTI volumes) become datasets whose pixels and
labels match the source exactly."""
from __future__ import annotations

import csv
import json
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


# ---------------------------------------------------------------- the same job as DICOM (in this process)

@pytest.fixture(scope="module")
def scheduler():
    """A Dask cluster inside this process: what a test patches here (a counting reader, a crashing
    convert) is what the tasks run."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def _run(sources, out, scheduler, **kw):
    from ingest.config import build_config
    from ingest.job import run

    settings = dict(sources=[str(s) for s in sources], out=str(out), scheduler=scheduler, salt=SALT,
                    shard_size="256KB", progress=False, modality="us")
    settings.update(kw)
    return run(build_config(**settings))


def test_nifti_volumes_are_read_once_per_convert_task(tmp_path, dicom_dir, scheduler, monkeypatch):
    """Three real MR volumes whose slices are shuffled across shards: each convert task reads each volume
    it needs once (reads = the (shard, volume) pairs of the dataset), not once per slice."""
    import SimpleITK as sitk

    import ingest.arrays

    files = sorted((dicom_dir / "mr_mprage_sagittal_192").glob("*.dcm"))
    volumes = {}
    for v in range(3):
        volume = np.stack([pydicom.dcmread(f).pixel_array for f in files[60 + 8 * v:68 + 8 * v]]).astype(np.int16)
        path = tmp_path / f"brain_{v}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(path))
        volumes[str(path)] = volume
    reads = []
    real_read = ingest.arrays.read_nifti
    monkeypatch.setattr(ingest.arrays, "read_nifti", lambda p: reads.append(p) or real_read(p))
    out = tmp_path / "ds"
    summary, stats = _run(sorted(volumes), out, scheduler, modality="mr", shard_size="600KB", val_fraction=0.0)
    manifest = shards.Dataset(out).manifest("mr", columns=["shard", "patient_hash"]).to_pylist()
    assert summary["samples"] == 24 and stats.generations == [0]
    pairs = {(r["shard"], r["patient_hash"]) for r in manifest}
    assert len({r["shard"] for r in manifest}) >= 3 and len({r["patient_hash"] for r in manifest}) == 3
    shards_per_volume = {h: sum(1 for _, p in pairs if p == h) for _, h in pairs}
    assert len(reads) == len(pairs) < 24
    by_hash = {shards.salted_hash(p, SALT): p for p in volumes}
    assert sorted(reads) == sorted(by_hash[h] for _, h in pairs)
    assert max(shards_per_volume.values()) > 1  # a volume's slices are spread over several shards
    got = _by_source(out)
    for path, volume in volumes.items():
        for z in range(len(volume)):
            assert np.array_equal(got[shards.sample_key(f"{path}#z/{z}", 0, SALT)][0], volume[z])


def test_second_generation_over_arrays_plans_only_new_images(tmp_path, medmnist_dir, scheduler, monkeypatch):
    """Generation 0: part of BreastMNIST. Generation 1 adds a second .npz (its own splits kept), an .npy with
    one non-integer image, and a damaged .npz: it is planned like a DICOM generation (plan/g001,
    shards -g001-), holds only the new images, survives a crash of its convert tasks (rerun finishes
    the same plan), and its failures are in the error ledger (scan and convert stage)."""
    import ingest.arrays
    import ingest.job
    from ingest.job import JobFailed
    from ingest.paths import work_dir

    (tmp_path / "src").mkdir()
    breast, extra = tmp_path / "src" / "breast_small.npz", tmp_path / "src" / "pneumonia_small.npz"
    take = {"train": 12, "val": 4, "test": 4}
    for name, path in (("breastmnist", breast), ("pneumoniamnist", extra)):
        raw = np.load(medmnist_dir / f"{name}.npz")
        np.savez(path, **{f"{s}_{what}": raw[f"{s}_{what}"][:n] for s, n in take.items() for what in ("images", "labels")})
    stack = raw["test_images"][:3].astype(np.float32)
    stack[1, 0, 0] += 0.5  # not an integer: cannot be stored losslessly
    np.save(tmp_path / "src" / "stack.npy", stack)
    (tmp_path / "src" / "damaged.npz").write_bytes(extra.read_bytes()[:300])
    out = tmp_path / "ds"

    summary, stats = _run([breast], out, scheduler)
    assert summary["samples"] == 20 and stats.generations == [0]
    first_keys = set(shards.Dataset(out).manifest(columns=["key"]).column("key").to_pylist())
    assert not hasattr(ingest.arrays, "run_arrays")  # no second job with its own plan and key set

    sources = [breast, extra, tmp_path / "src" / "stack.npy", tmp_path / "src" / "damaged.npz"]

    def crash(**kwargs):
        raise RuntimeError("worker lost")

    with monkeypatch.context() as mp:
        mp.setattr(ingest.job, "run_convert_task", crash)
        with pytest.raises(JobFailed):
            _run(sources, out, scheduler)
    assert (out / "plan" / "g001.json").exists() and list(work_dir(out, 1).glob("shards/*.parquet"))
    summary, stats = _run(sources, out, scheduler)  # resumes generation 1 (same sources: no rescan)
    assert stats.generations == [1] and not work_dir(out).exists()
    manifest = shards.Dataset(out).manifest(columns=["key", "shard", "split", "labels"]).to_pylist()
    new = {r["key"]: r for r in manifest if r["key"] not in first_keys}
    assert len(manifest) == 20 + 20 + 2 and first_keys <= {r["key"] for r in manifest}
    assert all("-g001-" in r["shard"] for r in new.values())
    assert all("-g000-" in r["shard"] for r in manifest if r["key"] in first_keys)
    for split, n in take.items():
        for i in range(n):
            row = new[shards.sample_key(f"{extra}#{split}/{i}", 0, SALT)]
            assert row["split"] == split and json.loads(row["labels"]) == {"label": float(raw[f"{split}_labels"][i, 0])}
    for i in (0, 2):
        assert shards.sample_key(f"{tmp_path / 'src' / 'stack.npy'}#{i}", 0, SALT) in new
    errors = {(e["source"], e["stage"]): e for e in readable_error_rows(out)}
    assert errors[(str(tmp_path / "src" / "damaged.npz"), "scan")]["reason"] == "unreadable"
    assert "not integers" in errors[(f"{tmp_path / 'src' / 'stack.npy'}#1", "convert")]["detail"]
    assert len(errors) == 2

    # once more with the same sources: everything is ingested, nothing is planned, nothing reported again
    summary, stats = _run(sources, out, scheduler, rescan=True)
    # (the image that failed was planned: like a DICOM slice that failed, it is not retried)
    assert stats.generations == [] and stats.new_slices == 0 and stats.already_ingested == 43
    assert summary["samples"] == 42 and len(readable_error_rows(out)) == 2

    # a lost manifest part of generation 1 is rewritten from its plan, with the .npz's labels again
    from shards.layout import manifest_path

    lost = next(r["shard"] for r in new.values() if r["labels"])
    manifest_path(out, "us", lost).unlink()
    summary, stats = _run(sources, out, scheduler)
    again = shards.Dataset(out).manifest(columns=["key", "shard", "split", "labels"]).to_pylist()
    assert summary["samples"] == 42 and sorted(again, key=lambda r: r["key"]) == sorted(manifest, key=lambda r: r["key"])
