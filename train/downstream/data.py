"""Labelled images for downstream tasks: MedMNIST-layout NumPy archives or medswav datasets.

Images become float32 tensors [N, 1, H, W] in [0, 1], scaled exactly as the pretraining pipeline scales
them (`augment_dali.normalize.normalize_numpy`, the NumPy twin of the DALI operator): with the
normalisation stored in the exported backbone (`train.export.backbone_normalisation`) when given, else
the default NormalizeConfig. MedMNIST archives carry no units: their pixels are "raw" and get the
per-image robust window, as 8-bit images ingested with `python -m ingest --modality M` do in pretraining.
Samples of a medswav dataset get the method of their modality and the dataset's recorded units. Labels
keep their shape: [N] int for binary and multi-class tasks, [N, L] float (NaN unknown) for multi-label ones.

Volume datasets (kind "volumes", for the 3-D encoder): each labelled volume is normalised as a whole (as
the 3-D pretraining pipeline does) and resampled trilinearly to one `volume_shape` (depth, rows, cols),
so that volumes of different sizes batch: tensors [N, 1, D, H, W].

NIfTI + CSV (for the 3-D encoder): a CSV with a `path` column (NIfTI files, relative to the CSV's
folder or absolute) and numeric label columns, optionally `split` (train / val / test; without it,
files sorted by path go 3 of every 5 to train, then one to val, one to test), `modality` (default ct)
and `units` (raw, the default, or HU). Each file is read as `python -m ingest --volumes --modality`
stores it (ingest.arrays.read_nifti_volume: SimpleITK, lossless integers) and normalised as a whole
exactly as a volume dataset's samples are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: torch.Tensor
    labels: np.ndarray


@dataclass
class LabelledData:
    splits: dict[str, Split]
    task: str          # binary | multiclass | multilabel
    n_outputs: int     # 1 for binary, C for multiclass, L for multilabel
    source: str

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]


def _normalize_config(normalisation: dict | None):
    """The NormalizeConfig of pretraining: from a backbone's normalisation records (all modalities share
    one config), else the default."""
    from augment_dali.config import NormalizeConfig

    if normalisation:
        return NormalizeConfig.from_dict(next(iter(normalisation.values()))["config"])
    return NormalizeConfig()


def to_unit_range(pixels: np.ndarray, method: str, config) -> np.ndarray:
    """[..., H, W] pixels -> float32 in [0, 1], each image as the pretraining pipeline normalises it."""
    from augment_dali.normalize import normalize_numpy

    x = np.asarray(pixels)
    out = np.empty(x.shape, np.float32)
    for i in np.ndindex(x.shape[:-2]):
        out[i] = normalize_numpy(x[i], method, config)
    return out


def infer_task(labels: np.ndarray) -> tuple[str, int]:
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] > 1:
        return "multilabel", y.shape[1]
    classes = np.unique(y[np.isfinite(y)] if y.dtype.kind == "f" else y)
    if len(classes) <= 2:
        return "binary", 1
    return "multiclass", int(classes.max()) + 1


def load_npz(path: str | Path, normalisation: dict | None = None,
             window: tuple[float, float] | None = None) -> LabelledData:
    """MedMNIST layout: `{split}_images` [N, H, W] (uint8) and `{split}_labels` [N, 1] or [N, L].

    `window`: a fixed (lo, hi) mapped to [0, 1] for every image instead of pretraining's per-image robust
    window, for encoders pretrained elsewhere: (0, 255) is the uint8 / 255 of most libraries' pipelines."""
    from augment_dali.config import HU_WINDOW, ROBUST_PERCENTILE, NormalizeConfig

    if window is not None and normalisation is not None:
        raise ValueError("load_npz: give either a backbone's normalisation or a fixed window, not both")
    config = _normalize_config(normalisation)
    method = ROBUST_PERCENTILE
    if window is not None:  # the fixed-window method (named after its CT use) with this window
        method, config = HU_WINDOW, NormalizeConfig(hu_window=tuple(window))
    archive = np.load(path)
    splits = {}
    for split in SPLITS:
        if f"{split}_images" not in archive:
            raise ValueError(f"{path}: no '{split}_images' array (MedMNIST layout expected)")
        images = archive[f"{split}_images"]
        labels = archive[f"{split}_labels"]
        if len(images) != len(labels):
            raise ValueError(f"{path}: {len(images)} {split} images but {len(labels)} labels")
        if images.ndim == 4:  # RGB MedMNIST sets: luminance
            images = images @ np.array([0.299, 0.587, 0.114])
        labels = labels.reshape(len(labels), -1)
        splits[split] = Split(torch.from_numpy(to_unit_range(images, method, config))[:, None], labels)
    task, n_outputs = infer_task(np.concatenate([s.labels for s in splits.values()]))
    if task != "multilabel":
        for s in splits.values():
            s.labels = s.labels.ravel().astype(np.int64)
    return LabelledData(splits, task, n_outputs, str(path))


VOLUME_SHAPE = (48, 96, 96)  # default (depth, rows, cols) of downstream volumes


def load_dataset(path: str | Path, size: int | None = None, normalisation: dict | None = None,
                 volume_shape: tuple[int, int, int] = VOLUME_SHAPE) -> LabelledData:
    """A medswav dataset with label names: `train` split for training; its `val` split is divided by
    patient hash into validation and test halves (deterministic). Volumes become [1, *volume_shape]."""
    import shards
    import torch.nn.functional as F

    from augment_dali.normalize import modality_units

    config = _normalize_config(normalisation)
    ds = shards.Dataset(path)
    volumes = ds.kind == "volumes"
    if volumes and (len(volume_shape) != 3 or min(volume_shape) < 1):
        raise ValueError(f"volume_shape {tuple(volume_shape)}: expected three positive sizes (depth, rows, cols)")
    methods = {m: config.method_for(m, modality_units(ds.units(m))) for m in ds.modalities}
    names = ds.info.get("label_names") or []
    if not names:
        raise ValueError(f"{path} has no labels: ingest it with --labels")
    buckets = {s: ([], []) for s in SPLITS}
    for _, pixels, meta, labels in shards.reader.iter_samples(path):
        if labels is None or not np.isfinite(labels).any():
            continue
        split = meta["split"]
        if split == "val":
            split = "test" if int(meta.get("patient_hash") or "0", 16) % 2 else "val"
        if volumes:
            buckets[split][0].append(_volume_input(pixels, methods[meta["modality"]], config, volume_shape))
            buckets[split][1].append(labels)
            continue
        x = torch.from_numpy(to_unit_range(pixels, methods[meta["modality"]], config))[None, None]
        if size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        buckets[split][0].append(x[0])
        buckets[split][1].append(labels)
    return _labelled(buckets, path)


def _volume_input(pixels: np.ndarray, method: str, config, volume_shape) -> torch.Tensor:
    """One volume as the 3-D encoder takes it: normalised as a whole, resampled to [1, *volume_shape]."""
    import torch.nn.functional as F

    from augment_dali.normalize import normalize_numpy

    x = torch.from_numpy(normalize_numpy(pixels, method, config))[None, None]
    return F.interpolate(x, size=tuple(volume_shape), mode="trilinear", align_corners=False)[0]


def _labelled(buckets: dict, path) -> LabelledData:
    splits = {}
    for split, (xs, ys) in buckets.items():
        if not xs:
            raise ValueError(f"{path}: no labelled samples for the {split} split")
        splits[split] = Split(torch.stack(xs), np.stack(ys))
    task, n_outputs = infer_task(np.concatenate([s.labels for s in splits.values()]))
    if task != "multilabel":
        for s in splits.values():
            s.labels = s.labels[:, 0].astype(np.int64)
    return LabelledData(splits, task, n_outputs, str(path))


NIFTI_CSV_COLUMNS = ("path", "split", "modality", "units")  # the CSV's columns that are not labels


def load_nifti_csv(path: str | Path, normalisation: dict | None = None,
                   volume_shape: tuple[int, int, int] = VOLUME_SHAPE) -> LabelledData:
    """NIfTI volumes listed in a CSV with their labels (module docstring) as [N, 1, *volume_shape]."""
    import csv

    from augment_dali.normalize import modality_units
    from ingest.arrays import read_nifti_volume

    if len(volume_shape) != 3 or min(volume_shape) < 1:
        raise ValueError(f"volume_shape {tuple(volume_shape)}: expected three positive sizes (depth, rows, cols)")
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = [c for c in (rows[0].keys() if rows else []) if c not in NIFTI_CSV_COLUMNS]
    if not rows or "path" not in rows[0] or not names:
        raise ValueError(f"{path}: expected a CSV with a 'path' column, label columns and at least one row")
    config = _normalize_config(normalisation)
    buckets = {s: ([], []) for s in SPLITS}
    for i, row in enumerate(sorted(rows, key=lambda r: r["path"])):
        split = row.get("split") or ("train" if i % 5 < 3 else SPLITS[i % 5 - 2])
        if split not in SPLITS:
            raise ValueError(f"{path}: split {split!r} of {row['path']} is not one of {SPLITS}")
        try:
            labels = np.array([float(row[n]) if row[n] not in ("", None) else np.nan for n in names], np.float32)
        except ValueError:
            raise ValueError(f"{path}: label columns {names} must be numeric ({row['path']})") from None
        units = row.get("units") or "raw"
        if units not in ("raw", "HU"):
            raise ValueError(f"{path}: units {units!r} of {row['path']}: expected raw or HU")
        method = config.method_for(row.get("modality") or "ct", modality_units({units}))
        file = Path(row["path"]) if Path(row["path"]).is_absolute() else path.parent / row["path"]
        if not file.exists():
            raise FileNotFoundError(f"{path}: NIfTI file not found: {file}")
        voxels, _ = read_nifti_volume(str(file))  # raises SourceError (a ValueError) for unusable files
        buckets[split][0].append(_volume_input(voxels, method, config, volume_shape))
        buckets[split][1].append(labels)
    return _labelled(buckets, path)


def load(path: str | Path, normalisation: dict | None = None,
         volume_shape: tuple[int, int, int] = VOLUME_SHAPE) -> LabelledData:
    """`normalisation`: the pretraining pipeline's, from `train.export.backbone_normalisation`;
    `volume_shape`: the size every volume of a volume dataset is resampled to."""
    p = Path(path)
    if p.suffix == ".npz":
        return load_npz(p, normalisation)
    if p.suffix.lower() == ".csv":
        return load_nifti_csv(p, normalisation, volume_shape)
    if p.is_dir():
        return load_dataset(p, normalisation=normalisation, volume_shape=volume_shape)
    raise ValueError(f"{path}: expected a MedMNIST-layout .npz file, a medswav dataset folder or a CSV of "
                     f"NIfTI volumes and labels")
