"""`python -m ingest X.nii.gz --modality ct --volumes`: one volume sample per NIfTI file, checked bit-exact
against SimpleITK's read of the file.

The NIfTI files are written in tmp from the real series of ../shared/data (SimpleITK's series read of
sub-volumes of the MPRAGE MR and the KiTS CT, every 4th/8th voxel in-plane), as a NIfTI from a
converter would hold them: the MR in its uint16 with its oblique direction, the CT as float32 holding
integer HU; plus unusable ones (fractional floats, a 2-D file, a 4-D file)."""
from __future__ import annotations

import numpy as np
import pytest

from _ingest_fixtures import manifest_rows, readable_error_rows, run_ingest


def _series(dicom_dir, name, first, depth):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetNumberOfThreads(1)
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(dicom_dir / name))[first:first + depth])
    return reader.Execute()


def write_nifti_sources(folder, dicom_dir):
    """{name: path} of the NIfTI files written into `folder` from the real series (module docstring)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    mr = _series(dicom_dir, "mr_mprage_sagittal_192", 80, 8)[::4, ::4, :]
    ct = sitk.Cast(_series(dicom_dir, "ct_kits_abdomen_18", 0, 6)[::8, ::8, :], sitk.sitkFloat32)
    images = {"mr.nii.gz": mr, "ct_float.nii": ct, "ct_half.nii.gz": ct * 0.5,
              "flat.nii.gz": mr[:, :, 0], "time.nii.gz": sitk.JoinSeries([mr, mr])}
    paths = {}
    for name, image in images.items():
        sitk.WriteImage(image, str(folder / name))
        paths[name] = folder / name
    return paths


@pytest.fixture(scope="module")
def scheduler():
    """One Dask cluster inside this process for the module's jobs (no worker processes to start)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def built(tmp_path_factory, dicom_dir, scheduler):
    tmp = tmp_path_factory.mktemp("nifti_volumes")
    paths = write_nifti_sources(tmp / "src", dicom_dir)
    (tmp / "labels.csv").write_text("path,label\nmr.nii.gz,1\nct_float.nii,0\n")
    summary, stats = run_ingest([tmp / "src"], tmp / "ds", volumes=True, modality="ct", units="HU",
                                labels=str(tmp / "labels.csv"), shard_size="64MB", scheduler=scheduler)
    return tmp / "ds", summary, stats, paths


def test_nifti_volumes_are_bit_exact_against_simpleitk(built):
    import SimpleITK as sitk

    from shards.reader import iter_samples

    root, summary, stats, paths = built
    assert summary["kind"] == "volumes" and summary["format_version"] == 2 and stats.new_slices == 3  # ct_half is rejected at convert
    stored = {tuple(labels): (pixels, meta) for _, pixels, meta, labels in iter_samples(root)}
    assert set(stored) == {(1.0,), (0.0,)}
    for name, label, dtype in (("mr.nii.gz", 1.0, np.uint16), ("ct_float.nii", 0.0, np.int16)):
        image = sitk.ReadImage(str(paths[name]))
        reference = sitk.GetArrayFromImage(image)
        pixels, meta = stored[(label,)]
        assert pixels.dtype == dtype and pixels.shape == reference.shape == (meta["depth"], 64, 64), name
        assert np.array_equal(pixels, reference), name   # the float CT holds integers: stored exactly in int16
        assert meta["spacing"] == list(image.GetSpacing())[::-1], name
        assert meta["direction"] == list(image.GetDirection()), name
        assert meta["origin"] == list(image.GetOrigin()), name
        assert meta["units"] == "HU" and meta["modality"] == "ct"
    assert abs(stored[(1.0,)][1]["direction"][0]) < 0.1  # the oblique sagittal MR kept its direction


def test_unusable_nifti_files_are_recorded_and_a_rerun_adds_only_new_files(built, dicom_dir, tmp_path, scheduler):
    import shutil

    import SimpleITK as sitk

    root, summary, _, paths = built
    reasons = {r["source"].rsplit("/", 1)[-1].split("#")[0]: r["reason"] for r in readable_error_rows(root)}
    assert reasons == {"ct_half.nii.gz": "unusable volume", "flat.nii.gz": "unusable source",
                       "time.nii.gz": "unusable source"}
    # exactly once: a rerun on a copy with one more file stores that file only, in a new generation
    for item in root.parent.glob("ds*"):  # the dataset and what lives beside it (path map, salt check)
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp_path / item.name)
    src = root.parent / "src"
    sitk.WriteImage(_series(dicom_dir, "ct_kits_abdomen_18", 10, 3)[::8, ::8, :], str(tmp_path / "late.nii.gz"))
    (tmp_path / "labels.csv").write_text((root.parent / "labels.csv").read_text() + "late.nii.gz,0\n")
    again, stats = run_ingest([src, tmp_path / "late.nii.gz"], tmp_path / "ds", volumes=True, modality="ct",
                              labels=str(tmp_path / "labels.csv"), shard_size="64MB", scheduler=scheduler)
    assert stats.generations == [1] and stats.new_slices == 1 and stats.already_ingested == 3
    assert again["samples"] == summary["samples"] + 1 == 3
    assert sorted(r["depth"] for r in manifest_rows(tmp_path / "ds")) == [3, 6, 8]


def test_downstream_reads_nifti_volumes_listed_in_a_csv_with_labels(built, tmp_path):
    """`train.downstream --data labels.csv`: the real-derived NIfTI files with a tiny CSV become labelled
    [N, 1, D, H, W] inputs, each volume normalised as a whole as pretraining does (robust window for raw
    units, the CT HU window for a CT file declared HU) and resampled to the volume shape."""
    import shutil

    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F

    from augment_dali.config import NormalizeConfig
    from augment_dali.normalize import normalize_numpy
    from train.downstream.data import load

    _, _, _, paths = built
    for name, copy in (("mr.nii.gz", "val_mr.nii.gz"), ("ct_float.nii", "test_ct.nii")):
        shutil.copy(paths[name], tmp_path / copy)
    (tmp_path / "labels.csv").write_text(
        f"path,label,split,modality,units\n{paths['mr.nii.gz']},1,train,mr,raw\n{paths['ct_float.nii']},0,train,ct,HU\n"
        "val_mr.nii.gz,1,val,mr,\ntest_ct.nii,0,test,,\n")
    shape = (4, 16, 16)
    data = load(tmp_path / "labels.csv", volume_shape=shape)
    assert data.task == "binary" and [len(data[s].labels) for s in ("train", "val", "test")] == [2, 1, 1]
    config = NormalizeConfig()
    expected = {"train": [(paths["mr.nii.gz"], "mr", "raw", 1), (paths["ct_float.nii"], "ct", "HU", 0)],
                "val": [(tmp_path / "val_mr.nii.gz", "mr", "raw", 1)], "test": [(tmp_path / "test_ct.nii", "ct", "raw", 0)]}
    for split, files in expected.items():
        assert data[split].images.shape == (len(files), 1, *shape), split
        for i, (file, modality, units, label) in enumerate(sorted(files, key=lambda f: str(f[0]))):
            voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(file)))
            x = torch.from_numpy(normalize_numpy(voxels, config.method_for(modality, units), config))[None, None]
            reference = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)[0]
            assert torch.allclose(data[split].images[i], reference, atol=1e-6), (split, file)
            assert data[split].labels[i] == label
    assert config.method_for("ct", "HU") != config.method_for("ct", "raw")  # the HU row really took the HU window
    (tmp_path / "bad.csv").write_text("path,label\nmissing.nii.gz,1\n")
    with pytest.raises(FileNotFoundError, match="NIfTI file not found"):
        load(tmp_path / "bad.csv", volume_shape=shape)
