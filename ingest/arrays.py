"""Non-DICOM sources: NumPy arrays (MedMNIST layout), 8/16-bit PNG and TIFF folders, NIfTI volumes.

They carry no DICOM header, so the modality is given on the command line (`--modality xr`) and each image
is identified by its source path and position: `sample_key("<source>#<locator>", 0, salt)` where the
locator is `<split>/<index>` in an `.npz`, `<index>` in an `.npy`, the file's path relative to its folder
for images, and `z/<index>` for a NIfTI slice. The job runs on the same Dask engine as DICOM ingestion,
one task per shard, and writes the same shards (`shards.ShardWriter`).

Splits: an `.npz` in MedMNIST layout keeps its own `train` / `val` / `test` splits; other sources are
split by a salted hash of the source file (one volume or one image = one patient), `--val-fraction` of
them to `val`. Each shard holds one split, images shuffled across sources within it. Labels: `{split}_labels` of an `.npz` (label names `label` or `label_0..L-1`), or
`--labels FILE` (CSV or Parquet with a `path` column, relative to the source folder or the file name,
plus numeric label columns). Pixels are stored exactly as read in their integer dtype (RGB becomes
BT.601 luma as for DICOM); floating-point images are accepted only when every value is an integer.

Resume: the plan (shard assignment) is written to `DATASET.paths/work/arrays-<id>.json` (beside the
dataset: it names source paths; ingest.paths) before any shard, `<id>`
being a hash of the listed images and settings; rerunning the same command finds it and writes only the
shards not yet committed. Running again with more sources plans only images not yet in the dataset.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

ARRAY_SUFFIXES = (".npz", ".npy")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MEDMNIST_SPLITS = ("train", "val", "test")


def is_array_source(path: str) -> bool:
    p = str(path).lower()
    return p.endswith(ARRAY_SUFFIXES + IMAGE_SUFFIXES + NIFTI_SUFFIXES) or Path(path).is_dir()


@dataclass(frozen=True)
class Item:
    source: str            # file path
    locator: str           # position inside the source ("" for a single image file)
    split: str | None      # the source's own split, else decided by hash
    labels: tuple | None   # label values in the order of the job's label names
    nbytes: int            # estimated stored size, for cutting shards

    @property
    def identity(self) -> str:
        return f"{self.source}#{self.locator}"


class SourceError(ValueError):
    """A whole source cannot be used (recorded in errors/, the job goes on)."""


def _npz_items(path: str) -> tuple[list[Item], list[str]]:
    with np.load(path) as archive:
        splits = [s for s in MEDMNIST_SPLITS if f"{s}_images" in archive]
        if not splits and "images" not in archive:
            raise SourceError(f"no '{{split}}_images' or 'images' array (MedMNIST layout expected); found {sorted(archive)}")
        items, names = [], []
        for split in splits or [None]:
            prefix = f"{split}_" if split else ""
            images = archive[f"{prefix}images"]
            labels = archive[f"{prefix}labels"] if f"{prefix}labels" in archive else None
            if labels is not None:
                if len(labels) != len(images):
                    raise SourceError(f"{len(images)} {split or ''} images but {len(labels)} labels")
                labels = labels.reshape(len(labels), -1).astype(np.float64)
                names = ["label"] if labels.shape[1] == 1 else [f"label_{j}" for j in range(labels.shape[1])]
            per_image = int(np.prod(images.shape[1:3])) * images.dtype.itemsize
            for i in range(len(images)):
                items.append(Item(path, f"{split}/{i}" if split else str(i), split,
                                  tuple(labels[i]) if labels is not None else None, per_image))
    return items, names


def _npy_items(path: str) -> list[Item]:
    arr = np.load(path, mmap_mode="r")
    if arr.ndim == 2:
        return [Item(path, "0", None, None, arr.nbytes)]
    if arr.ndim == 3:
        return [Item(path, str(i), None, None, arr[0].nbytes) for i in range(arr.shape[0])]
    raise SourceError(f"expected a 2-D image or a 3-D stack of images, got shape {arr.shape}")


def _nifti_items(path: str) -> list[Item]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    size = reader.GetSize()
    if len(size) == 2:
        return [Item(path, "z/0", None, None, size[0] * size[1] * 2)]
    if len(size) != 3:
        raise SourceError(f"expected a 2-D or 3-D image, got {len(size)} dimensions")
    return [Item(path, f"z/{z}", None, None, size[0] * size[1] * 2) for z in range(size[2])]


def _image_files(folder: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(folder):
        out += [os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(out)


def list_items(sources: list[str], label_table: dict[str, tuple] | None = None) -> tuple[list[Item], list[str], list[dict]]:
    """(items, label names, error rows) for every image of every source."""
    items, names, errors = [], [], []

    def image_item(path: str, base: str) -> Item:
        rel = os.path.relpath(path, base) if base else os.path.basename(path)
        labels = None
        if label_table is not None:
            labels = label_table.get(rel.replace(os.sep, "/")) or label_table.get(os.path.basename(path))
        return Item(path, "", None, labels, os.path.getsize(path))

    for source in sources:
        try:
            low = source.lower()
            if os.path.isdir(source):
                files = _image_files(source)
                if not files:
                    raise SourceError("folder holds no .png, .tif or .tiff image")
                items += [image_item(f, source) for f in files]
            elif not os.path.exists(source):
                raise SourceError("no such file or folder")
            elif low.endswith(".npz"):
                found, npz_names = _npz_items(source)
                if npz_names and names and npz_names != names:
                    raise SourceError(f"label columns {npz_names} differ from earlier sources' {names}")
                names = names or npz_names
                items += found
            elif low.endswith(".npy"):
                items += _npy_items(source)
            elif low.endswith(NIFTI_SUFFIXES):
                items += _nifti_items(source)
            elif low.endswith(IMAGE_SUFFIXES):
                items.append(image_item(source, ""))
            else:
                raise SourceError("not a .npz, .npy, .png, .tif(f), .nii(.gz) file or an image folder")
        except SourceError as e:
            errors.append({"source": source, "stage": "scan", "reason": "unusable source", "detail": str(e)})
        except (OSError, ValueError, RuntimeError) as e:
            errors.append({"source": source, "stage": "scan", "reason": "unreadable", "detail": f"{type(e).__name__}: {e}"})
    return items, names, errors


def load_label_table(path: str) -> tuple[dict[str, tuple], list[str]]:
    """CSV or Parquet with a `path` column and numeric label columns."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pq.read_table(path) if path.lower().endswith(".parquet") else pcsv.read_csv(path)
    if "path" not in table.column_names:
        raise SourceError(f"{path}: a label table for image files needs a 'path' column")
    names = [c for c in table.column_names if c != "path"]
    columns = [np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=np.float64) for c in names]
    return {p: tuple(col[i] for col in columns) for i, p in enumerate(table.column("path").to_pylist())}, names


# --- reading one image ------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _npz_array(path: str, name: str) -> np.ndarray:
    with np.load(path) as archive:
        return archive[name]


@lru_cache(maxsize=2)
def _nifti_volume(path: str) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(path))  # [z, y, x]


def _integral(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype.kind in "iu":
        return arr
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        lo, hi = arr.min(), arr.max()
        for dt in (np.uint8, np.int16, np.uint16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                return arr.astype(dt)
    raise SourceError(f"{what}: {arr.dtype} pixels that are not integers cannot be stored losslessly")


def load_item(item: Item) -> np.ndarray:
    """The 2-D integer image of one item."""
    from .pixels import luma

    low = item.source.lower()
    if low.endswith(".npz"):
        split, index = item.locator.split("/") if "/" in item.locator else (None, item.locator)
        arr = _npz_array(item.source, f"{split}_images" if split else "images")[int(index)]
    elif low.endswith(".npy"):
        stack = np.load(item.source, mmap_mode="r")
        arr = np.array(stack if stack.ndim == 2 else stack[int(item.locator)])
    elif low.endswith(NIFTI_SUFFIXES):
        vol = _nifti_volume(item.source)
        arr = vol if vol.ndim == 2 else vol[int(item.locator.split("/")[1])]
    else:
        from PIL import Image

        with Image.open(item.source) as im:
            arr = np.array(im)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = luma(np.ascontiguousarray(arr[..., :3]))
    if arr.ndim != 2:
        raise SourceError(f"expected a 2-D image, got shape {arr.shape}")
    return np.ascontiguousarray(_integral(arr, item.identity))


# --- the job --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArraysJob:
    modality: str
    val_fraction: float
    seed: int
    shard_size: int


def _plan(items: list[Item], job: ArraysJob, salt: str, plan_id: str) -> dict:
    from shards import salted_hash

    from .plan import split_of

    rng = np.random.default_rng(job.seed)
    by_split: dict[str, list[dict]] = {}
    sizes: dict[str, list[int]] = {}
    for i in rng.permutation(len(items)):  # shuffled across sources: DALI only shuffles within a buffer
        item = items[int(i)]
        split = item.split or split_of(salted_hash(item.source, salt), job.val_fraction)
        by_split.setdefault(split, []).append({"source": item.source, "locator": item.locator, "split": split,
                                               "labels": list(item.labels) if item.labels is not None else None})
        sizes.setdefault(split, []).append(item.nbytes)
    # One split per shard (as for DICOM): a loader reading one split needs no per-sample filtering.
    shards = []
    for split in sorted(by_split):
        current, size = [], 0
        for spec, nbytes in zip(by_split[split], sizes[split]):
            current.append(spec)
            size += nbytes
            if size >= job.shard_size:
                shards.append(current)
                current, size = [], 0
        if current:
            shards.append(current)
    names = [f"{job.modality}-a{plan_id[:8]}-{k:06d}" for k in range(len(shards))]
    return {"id": plan_id, "modality": job.modality, "shards": dict(zip(names, shards))}


def convert_shard(entry: tuple[str, list[dict]], root: str, modality: str, label_names: list[str], salt: str,
                  direct_io: bool = True, hash_paths: bool = False) -> int:
    """One Dask task: write one shard of non-DICOM images; unreadable images go to errors/."""
    from shards import SampleMeta, ShardWriter, salted_hash, sample_key, write_errors

    from .scan import scan_error

    name, specs = entry
    errors, written, failed = [], 0, []
    with ShardWriter(root, modality, name, label_names=label_names, direct_io=direct_io) as writer:
        for spec in specs:
            item = Item(spec["source"], spec["locator"], spec["split"], None, 0)
            try:
                pixels = load_item(item)
            except (SourceError, OSError, ValueError, IndexError, RuntimeError) as e:
                errors.append(scan_error(item.identity, "convert", "unreadable image",
                                         f"{type(e).__name__}: {str(e)[:200]}", salt, hash_paths))
                failed.append(item.identity)
                continue
            meta = SampleMeta(modality=modality, split=spec["split"], source_hash=salted_hash(item.source, salt),
                              sop_hash=salted_hash(item.identity, salt), patient_hash=salted_hash(item.source, salt),
                              photometric="MONOCHROME2", bits_stored=pixels.dtype.itemsize * 8,
                              bits_allocated=pixels.dtype.itemsize * 8, pixel_representation=int(pixels.dtype.kind == "i"))
            labels = np.asarray(spec["labels"], np.float32) if spec["labels"] is not None and label_names else None
            writer.write(sample_key(item.identity, 0, salt), pixels, meta, labels=labels)
            written += 1
        write_errors(root, f"convert-{name}", errors)
        _write_error_map(root, f"convert-{name}", failed, salt, hash_paths)
    return written


def _write_error_map(root, name: str, sources: list[str], salt: str, hash_paths: bool) -> None:
    """The readable map (ingest.paths) of the sources behind one errors/ file, when those are hashed."""
    from .paths import arrays_map_part, write_map
    from .scan import map_row

    if hash_paths and sources:
        write_map(arrays_map_part(root, name), [map_row(src, salt) for src in sources])


def run_arrays(cfg, modality: str) -> tuple[dict, dict]:
    """`python -m ingest SOURCE... --modality M`: the whole job for non-DICOM sources.
    Returns (dataset.json content, this run's counts)."""
    from .job import make_dataset_folder, check_out_folder
    from .lock import DatasetLock

    check_out_folder(cfg.root, list(cfg.sources))
    make_dataset_folder(cfg.root)
    with DatasetLock(cfg.root, cfg.lock_timeout):  # one writer per dataset, as for DICOM sources
        return _run_arrays_locked(cfg, modality)


def _run_arrays_locked(cfg, modality: str) -> tuple[dict, dict]:
    import hashlib

    from shards import Dataset, ShardWriter, sample_key, write_errors

    from .engine import dask_client, run_phase
    from .finalize import finalize
    from .job import check_path_privacy
    from .paths import make_map_dir, remove_empty, work_dir
    from .salt import read_state, resolve_salt, write_state
    from .scan import scan_error

    root = cfg.root
    salt, origin = resolve_salt(root, cfg.salt)
    print(f"salt: from {origin}", file=sys.stderr)
    check_path_privacy(root, read_state(root), cfg.hash_paths)
    make_map_dir(root)
    if not read_state(root):
        write_state(root, {"hash_paths": cfg.hash_paths})
    label_table, table_names = load_label_table(cfg.labels) if cfg.labels else (None, [])
    items, names, errors = list_items(list(cfg.sources), label_table)
    rejected = [e["source"] for e in errors]
    errors = [scan_error(e["source"], e["stage"], e["reason"], e["detail"], salt, cfg.hash_paths) for e in errors]
    label_names = table_names or names
    write_errors(root, "scan-arrays", errors)
    _write_error_map(root, "scan-arrays", rejected, salt, cfg.hash_paths)
    existing = set(Dataset(root).manifest(columns=["key"]).column("key").to_pylist()) if Dataset(root).modalities else set()
    job = ArraysJob(modality, cfg.val_fraction, cfg.seed, cfg.shard_size)
    digest = hashlib.blake2b(json.dumps([job.__dict__, [i.identity for i in items]]).encode(), digest_size=8).hexdigest()
    plan_path = work_dir(root) / f"arrays-{digest}.json"
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
    else:
        new = [i for i in items if sample_key(i.identity, 0, salt) not in existing]
        plan = _plan(new, job, salt, digest)
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = plan_path.with_name(f".{plan_path.name}.tmp")
        tmp.write_text(json.dumps(plan))
        os.replace(tmp, plan_path)
    todo = [(n, s) for n, s in plan["shards"].items() if not ShardWriter.is_committed(root, modality, n)]
    print(f"{len(items):,} images listed, {sum(len(s) for s in plan['shards'].values()):,} planned in "
          f"{len(plan['shards'])} shard(s), {len(todo)} to write", file=sys.stderr)
    with dask_client(cfg) as client:
        _, failures = run_phase(client, "convert", convert_shard, todo, key_of=lambda e: f"arrays-{e[0]}",
                                progress=cfg.progress, root=str(root), modality=modality,
                                label_names=label_names, salt=salt, direct_io=cfg.direct_io,
                                hash_paths=cfg.hash_paths)
    if failures:
        from .job import JobFailed

        raise JobFailed(f"{len(failures)} shard task(s) failed: {failures[0][1]}; rerun the same command")
    plan_path.unlink()
    remove_empty(root)
    stats = {"files": len(set(i.source for i in items)), "new_slices": sum(len(v) for v in plan["shards"].values()),
             "already_ingested": len(items) - sum(len(v) for v in plan["shards"].values()),
             "shards_written": len(todo), "shards_skipped": len(plan["shards"]) - len(todo)}
    summary = finalize(root, {"arrays_modality": modality, "seed": cfg.seed, "val_fraction": cfg.val_fraction,
                              "shard_size": cfg.shard_size})
    return summary, stats
