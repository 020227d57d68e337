"""Real DICOM series stacked into volumes for the 3-D augmentation and 3-D SwAV tests."""
from __future__ import annotations

import numpy as np
import pydicom


def load_series(folder):
    """[D, H, W] float32 volume in [0, 1] (modality LUT applied, min-max) and its (z, y, x) spacing,
    slices sorted by their position along the normal of the image plane."""
    slices = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    row, col = (np.asarray(slices[0].ImageOrientationPatient, np.float64).reshape(2, 3))
    normal = np.cross(row, col)
    slices.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, np.float64))))
    pos = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, np.float64))) for ds in slices]
    vol = np.stack([ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1) or 1)
                    + float(getattr(ds, "RescaleIntercept", 0) or 0) for ds in slices])
    vol = (vol - vol.min()) / max(vol.max() - vol.min(), 1e-12)
    dz = float(np.median(np.diff(pos)))
    dy, dx = (float(v) for v in slices[0].PixelSpacing)
    return vol.astype(np.float32), (dz, dy, dx)


VOLUME_SALT = "volume-test-salt"


def _series_subvolumes(folder, count: int, depth: int, step: int, stride: int, first: int = 0):
    """`count` overlapping [depth, ., .] sub-volumes of a real series as SimpleITK reads it (slices ordered
    along the normal, from slice `first` on), every `step`-th voxel in-plane, starting `stride` slices
    apart; with their
    (z, y, x) spacing, direction and origin and the series UID."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    uids = reader.GetGDCMSeriesIDs(str(folder))
    assert len(uids) == 1, uids
    names = reader.GetGDCMSeriesFileNames(str(folder), uids[0])   # ordered along the slice normal
    reader.SetFileNames(names[first:first + (count - 1) * stride + depth])  # only the slices used
    image = reader.Execute()
    voxels = sitk.GetArrayFromImage(image)              # (depth, rows, cols), the stored integer type
    sx, sy, sz = image.GetSpacing()
    for i in range(count):
        start = i * stride
        sub = np.ascontiguousarray(voxels[start:start + depth, ::step, ::step])
        assert sub.shape[0] == depth, (folder, i, sub.shape)
        origin = list(image.TransformIndexToPhysicalPoint((0, 0, start)))
        yield f"{uids[0]}.{i}", sub, [sz, sy * step, sx * step], list(image.GetDirection()), origin


def build_volume_dataset(root, dicom_dir, per_modality: int = 6, labelled: bool = False):
    """A tiny volume dataset (dataset kind "volumes") from the real CT and MR series, written with
    shards.ShardWriter: ct = 6 sub-volumes 8 x 64 x 64 of the KiTS abdomen CT (int16 HU), mr = 6
    sub-volumes 16 x 64 x 64 of the middle of the MPRAGE series (raw units), two shards per modality.
    `labelled`: one label "mr" (1 for the MR volumes, 0 for the CT ones); volumes 4 and 5 of each
    modality in the val split, of two patients (downstream divides val by patient into val and test)."""
    import shards

    sources = {
        "ct": (_series_subvolumes(dicom_dir / "ct_kits_abdomen_18", per_modality, 8, 8, 2), "HU"),
        "mr": (_series_subvolumes(dicom_dir / "mr_mprage_sagittal_192", per_modality, 16, 4, 8, first=72), "raw"),
    }
    for modality, (items, units) in sources.items():
        items = list(items)
        for s, part in enumerate(np.array_split(np.arange(len(items)), 2)):
            with shards.ShardWriter(root, modality, f"{modality}-g000-{s:06d}",
                                    label_names=("mr",) if labelled else ()) as w:
                for i in part:
                    uid, voxels, spacing, direction, origin = items[i]
                    if modality == "ct":  # SimpleITK applies the modality LUT: HU in int16
                        voxels = voxels.astype(np.int16)
                    held_out = labelled and i in (4, 5)
                    meta = shards.SampleMeta(modality=modality, split="val" if held_out else "train", units=units,
                                             series_hash=shards.salted_hash(uid, VOLUME_SALT), spacing=spacing,
                                             direction=direction, origin=origin,
                                             patient_hash=f"{i - 3:02x}" if held_out else "")
                    label = np.array([float(modality == "mr")], np.float32) if labelled else None
                    w.write(shards.sample_key(uid, 0, VOLUME_SALT), voxels, meta, labels=label)
    shards.write_dataset_json(root)
    return root
