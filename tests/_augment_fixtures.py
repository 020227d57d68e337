"""A small real dataset for the augment_dali tests, written with shards.ShardWriter.

ct: the 18 real abdominal CT slices (modality LUT applied -> int16 HU, units "HU"), 2 shards.
(mr, xr and us have units "raw", as ingest records them.)
mr: 48 slices of the real MPRAGE series (uint16), 3 shards.
xr: 60 PneumoniaMNIST chest X-rays (uint8, 28 x 28) with the pneumonia label, 2 shards.
us: 40 BreastMNIST ultrasound images (uint8, 28 x 28), unlabelled, 1 shard.
Every 6th sample of each modality is in the "val" split, so split filtering is exercised.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

import shards

SALT = "augment-test-salt"
LABEL_NAMES = ("pneumonia",)
COUNTS = {"ct": 18, "mr": 48, "xr": 60, "us": 40}
SHARDS_PER_MODALITY = {"ct": 2, "mr": 3, "xr": 2, "us": 1}


def _ct(dicom_dir: Path):
    for path in sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        hu = (ds.pixel_array.astype(np.int32) * int(slope) + int(intercept)).astype(np.int16)
        yield ds.SOPInstanceUID, hu, dict(rescale_slope=slope, rescale_intercept=intercept, rescale_applied=True,
                                          units="HU"), None


def _mr(dicom_dir: Path):
    paths = sorted((dicom_dir / "mr_mprage_sagittal_192").glob("*.dcm"))
    for i, path in enumerate(paths[2:194:4]):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        if i % 3 == 1:  # some slices stored as int16 (same values): real exports mix int16 and uint16 MR
            assert pixels.max() < 2**15
            pixels = pixels.astype(np.int16)
        yield ds.SOPInstanceUID, pixels, {"units": "raw"}, None


def _medmnist(medmnist_dir: Path, name: str, count: int, labelled: bool):
    z = np.load(medmnist_dir / f"{name}.npz")
    for i in range(count):
        labels = np.array([z["train_labels"][i, 0]], np.float32) if labelled else None
        yield f"{name}.train.{i}", z["train_images"][i], {"units": "raw"}, labels


def build_dataset(root: Path, dicom_dir: Path, medmnist_dir: Path) -> Path:
    sources = {
        "ct": (_ct(dicom_dir), ()),
        "mr": (_mr(dicom_dir), ()),
        "xr": (_medmnist(medmnist_dir, "pneumoniamnist", COUNTS["xr"], True), LABEL_NAMES),
        "us": (_medmnist(medmnist_dir, "breastmnist", COUNTS["us"], False), ()),
    }
    for modality, (items, label_names) in sources.items():
        items = list(items)
        assert len(items) == COUNTS[modality], (modality, len(items))
        parts = np.array_split(np.arange(len(items)), SHARDS_PER_MODALITY[modality])
        for s, part in enumerate(parts):
            with shards.ShardWriter(root, modality, f"{modality}-g000-{s:06d}", label_names=label_names) as w:
                for i in part:
                    uid, pixels, extra, labels = items[i]
                    meta = shards.SampleMeta(modality=modality, split="val" if i % 6 == 5 else "train",
                                             sop_hash=shards.salted_hash(uid, SALT), **extra)
                    w.write(shards.sample_key(uid, 0, SALT), pixels, meta, labels=labels)
    shards.write_dataset_json(root)
    return root


def train_count(modality: str) -> int:
    return sum(1 for i in range(COUNTS[modality]) if i % 6 != 5)
