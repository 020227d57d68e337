"""Non-DICOM sources: NumPy arrays (MedMNIST layout), 8/16-bit PNG and TIFF images, NIfTI volumes.

They go through the same job as DICOM (ingest.job: scan -> plan -> convert -> finalize, generations,
resume, error ledger); this module knows how to list their images (scan) and read their pixels
(convert). They carry no DICOM header, so the modality is given on the command line (`--modality xr`).

Identity. Each image is identified by its source path and position, `"<source>#<locator>"`, where the
locator is `<split>/<index>` in an `.npz`, `<index>` in an `.npy`, empty for an image file, and
`z/<index>` for a NIfTI slice. This identity plays the SOPInstanceUID's part: the sample key is
`sample_key(identity, 0, salt)`, its salted hash is the inventory's `sop_hash` (deduplication and
"already ingested" work as for DICOM) and `source_hash` (the readable map beside the dataset resolves
it to the identity). The patient (and series, study) is the source file: one volume or one image = one
patient.

Scan reads headers only: the member headers of an `.npz` (plus its small `{split}_labels` arrays), an
`.npy` memory-mapped, a NIfTI header, an image's header; it writes one inventory row per image with the
extension columns `split` and `labels` (ingest.scan.INVENTORY_EXTENSION), `transfer_syntax` =
NON_DICOM_SYNTAX and `native_layout` = {"non_dicom": format}; `size` and `declared_bytes` are the
image's own bytes (what `--max-pixel-bytes` limits).

Splits: an `.npz` in MedMNIST layout keeps its own `train` / `val` / `test` splits (the inventory's
`split`); other sources are split by the salted hash of the source file, `--val-fraction` of them to
`val` (plan rule 4). Labels: `{split}_labels` of an `.npz` (label names `label` or `label_0..L-1`), or
`--labels FILE` (CSV or Parquet with a `path` column, relative to the source folder or the file name,
plus numeric label columns). Pixels are stored exactly as read in their integer dtype (RGB becomes
BT.601 luma as for DICOM); floating-point images are accepted only when every value is an integer.

Volumes (`--volumes --modality M`, docs/INGEST.md "NIfTI volumes"): one row per 3-D NIfTI file
(locator `volume`), written whole by `write_volumes` with SimpleITK's geometry; other formats, 2-D and
4-D files are rejected at scan.

Convert: a shard's images are grouped by source file and each file is read once per task (a whole
NIfTI volume, each `.npz` member array once), then written in the plan's shuffled order; the task
holds at most one source's arrays plus the shard's own decoded images.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import zipfile
from typing import Iterator

import numpy as np

ARRAY_SUFFIXES = (".npz", ".npy")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MEDMNIST_SPLITS = ("train", "val", "test")
NON_DICOM_SYNTAX = "medswav-non-dicom"  # the inventory's transfer_syntax of these rows (not a DICOM UID)
# modality codes of non-DICOM rows: the partition itself, mapped to it whatever the config's modality_map
MODALITY_CODES = {"ct": "CT", "mr": "MR", "xr": "XR", "us": "US"}


class SourceError(ValueError):
    """A whole source or one image cannot be used (recorded in errors/, the job goes on)."""


def source_format(path: str) -> str | None:
    low = path.lower()
    for fmt, suffixes in (("npz", (".npz",)), ("npy", (".npy",)), ("nifti", NIFTI_SUFFIXES),
                          ("image", IMAGE_SUFFIXES)):
        if low.endswith(suffixes):
            return fmt
    return None


def layout(fmt: str) -> str:
    """The inventory's native_layout of a non-DICOM row: what tells convert to read it here."""
    return json.dumps({"non_dicom": fmt})


def is_non_dicom(native_layout: str | None) -> bool:
    return bool(native_layout) and native_layout.startswith('{"non_dicom"')


def split_identity(identity: str) -> tuple[str, str]:
    """(source file, locator) of `"<source>#<locator>"` (locators never hold '#')."""
    source, _, locator = identity.rpartition("#")
    return source, locator


# --- scan: the images of one source, from headers only ---------------------------------------------

def _member_header(archive: zipfile.ZipFile, name: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of one .npy member of an .npz, from its header (the data is not read)."""
    with archive.open(name) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


def _npz_images(path: str):
    """Yield (locator, shape of one image, dtype, split, labels) per image; the label names first."""
    with zipfile.ZipFile(path) as archive:
        members = {n[:-4]: n for n in archive.namelist() if n.endswith(".npy")}
        splits = [s for s in MEDMNIST_SPLITS if f"{s}_images" in members]
        if not splits and "images" not in members:
            raise SourceError(f"no '{{split}}_images' or 'images' array (MedMNIST layout expected); "
                              f"found {sorted(members)}")
        found, names = [], []
        for split in splits or [None]:
            prefix = f"{split}_" if split else ""
            shape, dtype = _member_header(archive, members[f"{prefix}images"])
            if len(shape) not in (3, 4):
                raise SourceError(f"{prefix}images: expected a stack of 2-D (or RGB) images, got shape {shape}")
            labels = None
            if f"{prefix}labels" in members:
                with archive.open(members[f"{prefix}labels"]) as f:
                    labels = np.load(f)  # small: one row per image
                if len(labels) != shape[0]:
                    raise SourceError(f"{shape[0]} {split or ''} images but {len(labels)} labels")
                labels = labels.reshape(len(labels), -1).astype(np.float32)
                names = ["label"] if labels.shape[1] == 1 else [f"label_{j}" for j in range(labels.shape[1])]
            found.append((split, prefix, shape, dtype, labels))
    yield names
    for split, prefix, shape, dtype, labels in found:
        for i in range(shape[0]):
            yield (f"{split}/{i}" if split else str(i), shape[1:], dtype, split,
                   labels[i].tolist() if labels is not None else None)


def _npy_images(path: str):
    arr = np.load(path, mmap_mode="r")  # the header only: nothing of the data is read
    if arr.ndim == 2:
        yield "0", arr.shape, arr.dtype
    elif arr.ndim == 3:
        for i in range(arr.shape[0]):
            yield str(i), arr.shape[1:], arr.dtype
    else:
        raise SourceError(f"expected a 2-D image or a 3-D stack of images, got shape {arr.shape}")


def _nifti_images(path: str):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()  # the header only
    size = reader.GetSize()  # (x, y[, z])
    dtype = _sitk_dtype(reader)
    if len(size) == 2:
        yield "z/0", (size[1], size[0]), dtype
    elif len(size) == 3:
        for z in range(size[2]):
            yield f"z/{z}", (size[1], size[0]), dtype
    else:
        raise SourceError(f"expected a 2-D or 3-D image, got {len(size)} dimensions")


def _nifti_volume(path: str):
    """The one volume of a NIfTI file (--volumes): locator "volume", shape (depth, rows, cols). A 2-D
    file has no depth and a 4-D file (a time series) is several volumes: both are rejected whole."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()  # the header only
    size = reader.GetSize()  # (x, y, z[, t])
    if len(size) != 3 or size[2] < 2:
        raise SourceError(f"--volumes takes 3-D NIfTI volumes of depth >= 2, got size {tuple(size)} "
                          f"(a 4-D file: split it into 3-D files first)")
    yield "volume", (size[2], size[1], size[0]), _sitk_dtype(reader)


def _sitk_dtype(reader) -> np.dtype:
    """The integer type a SimpleITK pixel type is stored in (<= 32 bits; floats checked at convert)."""
    import SimpleITK as sitk

    kind = sitk.GetPixelIDValueAsString(reader.GetPixelID())  # e.g. "16-bit signed integer"
    bits = re.search(r"(\d+)-bit", kind)
    itemsize = min(4, int(bits.group(1)) // 8) if bits else 2
    return np.dtype(f"{'i' if ' signed' in kind else 'u'}{max(1, itemsize)}")


def _image_file(path: str):
    from PIL import Image

    with Image.open(path) as im:  # reads the header only
        width, height = im.size
        mode = im.mode
    itemsize = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}.get(mode, 1)
    yield "", (height, width), np.dtype(f"u{itemsize}")


def image_rows(source: str, *, modality: str, salt: str, hash_paths: bool,
               path_labels=None, volumes: bool = False) -> tuple[Iterator[dict], list[str]]:
    """(inventory rows, label names) of every image of one source file, the rows as an iterator (an
    archive may hold millions of images: the scan task writes them in parts). The source is checked
    as a whole first: raises SourceError (or OSError, ValueError...) when it cannot be used; the rows
    themselves then only compute hashes. `path_labels(source)` gives the --labels table's row of an
    image file (None: unlabelled). Each row has an extra "identity" (for the map; not a column).
    `volumes`: one row per NIfTI file, its whole volume (labelled like an image file); other formats
    are rejected."""
    fmt = source_format(source)
    names: list[str] = []
    if volumes:
        if fmt != "nifti":
            raise SourceError("--volumes with --modality takes NIfTI volumes (.nii, .nii.gz) only")
        labels = path_labels(source) if path_labels else None
        found = ((loc, shape, dt, None, labels) for loc, shape, dt in _nifti_volume(source))
    elif fmt == "npz":
        found = _npz_images(source)
        names = next(found)
    elif fmt == "npy":
        found = ((loc, shape, dt, None, None) for loc, shape, dt in _npy_images(source))
    elif fmt == "nifti":
        found = ((loc, shape, dt, None, None) for loc, shape, dt in _nifti_images(source))
    elif fmt == "image":
        labels = path_labels(source) if path_labels else None
        found = ((loc, shape, dt, None, labels) for loc, shape, dt in _image_file(source))
    else:
        raise SourceError("not a .npz, .npy, .png, .tif(f), .nii(.gz) file or an image folder")
    first = next(found, None)  # the generators check their source before their first image
    return _rows(itertools.chain([first] if first else [], found), source, fmt, modality, salt, hash_paths), names


def _rows(found, source: str, fmt: str, modality: str, salt: str, hash_paths: bool) -> Iterator[dict]:
    from shards import salted_hash

    from .scan import path_text

    file_text = path_text(source)
    file_hash = salted_hash(file_text, salt)  # the patient: one file = one volume or image
    code, kind = MODALITY_CODES[modality], layout(fmt)
    for locator, shape, dtype, split, labels in found:
        identity = f"{file_text}#{locator}"
        rows_, cols = int(shape[-2]), int(shape[-1])  # a volume's shape is (depth, rows, cols)
        itemsize = min(4, max(1, np.dtype(dtype).itemsize))  # stored as an integer type of <= 32 bits
        nbytes = int(np.prod(shape)) * itemsize
        image_hash = salted_hash(identity, salt)
        yield {
            "identity": identity, "source": "" if hash_paths else identity, "source_hash": image_hash,
            "size": nbytes, "sop_hash": image_hash,
            "series_hash": file_hash, "study_hash": file_hash, "patient_hash": file_hash,
            "modality_code": code, "sop_class_uid": "", "rows": rows_, "cols": cols, "frames": 1,
            "samples_per_pixel": 1, "bits_allocated": itemsize * 8, "bits_stored": itemsize * 8,
            "pixel_representation": int(np.dtype(dtype).kind == "i"), "photometric": "MONOCHROME2",
            "transfer_syntax": NON_DICOM_SYNTAX, "lossy": False, "has_pixels": True, "float_pixels": False,
            "pixel_length": -1, "pixel_end": -1, "declared_bytes": nbytes,
            "native_layout": kind, "split": split, "labels": labels,
        }


def load_label_table(path: str) -> tuple[dict[str, list[float]], list[str]]:
    """CSV or Parquet with a `path` column and numeric label columns: ({path: labels}, names)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from .config import ConfigError

    if not os.path.exists(path):
        raise ConfigError(f"labels file not found: {path}")
    try:
        table = pq.read_table(path) if str(path).lower().endswith((".parquet", ".pq")) else pcsv.read_csv(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types on a bad file
        raise ConfigError(f"labels file {path} is unreadable: {str(e).splitlines()[0]}") from None
    if "path" not in table.column_names:
        raise ConfigError(f"{path}: a label table for non-DICOM images needs a 'path' column")
    names = [c for c in table.column_names if c != "path"]
    try:
        columns = [np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=np.float32) for c in names]
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: label columns must be numeric") from None
    return {p: [float(col[i]) for col in columns] for i, p in enumerate(table.column("path").to_pylist())}, names


_TABLES: dict = {}


def _label_table(path: str):
    """The --labels table, loaded once per worker process."""
    stat = os.stat(path)
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _TABLES:
        _TABLES.clear()
        _TABLES[key] = load_label_table(path)
    return _TABLES[key]


def run_scan_task(task, root: str, generation: int, salt: str, hash_paths: bool, modality: str,
                  sources: list[str], labels_path: str | None = None,
                  exclude: frozenset[str] = frozenset(), volumes: bool = False) -> dict:
    """Dask task: the inventory part(s) of the non-DICOM files of one scan task (ingest.scan.ScanTask),
    with their map parts beside the dataset. A file given as a source whose format is unknown is
    rejected; inside folders such files are skipped. Returns counts, error rows and label names."""
    import pyarrow as pa

    from .scan import INVENTORY_EXTENSION, INVENTORY_SCHEMA, ROWS_PER_PART, map_row, scan_error, task_sources, write_inventory_part

    schema = pa.schema([*INVENTORY_SCHEMA, *INVENTORY_EXTENSION])
    given = set(sources)
    folders = sorted((s for s in sources if os.path.isdir(s)), key=len, reverse=True)
    table, names_by_path = _label_table(labels_path) if labels_path else (None, [])

    def path_labels(path: str):
        if table is None:
            return None
        base = next((f for f in folders if path.startswith(f.rstrip(os.sep) + os.sep)), None)
        rel = os.path.relpath(path, base).replace(os.sep, "/") if base else os.path.basename(path)
        return table.get(rel) or table.get(os.path.basename(path))

    rows, paths, errors, rejected = [], [], [], []
    label_names: dict[str, list[str]] = {}  # npz source -> its label names (the client checks they agree)
    n_files = n_rows = batch = 0

    def flush() -> None:
        nonlocal rows, paths, batch
        write_inventory_part(root, generation, task.index, batch, rows, schema, paths, hash_paths)
        rows, paths, batch = [], [], batch + 1

    walker, sources_of_task = task_sources(task, exclude)
    for src in sources_of_task:
        if source_format(src) is None and src not in given:
            continue  # another kind of file inside an image folder
        n_files += 1
        try:
            found, names = image_rows(src, modality=modality, salt=salt, hash_paths=hash_paths,
                                      path_labels=path_labels, volumes=volumes)
        except SourceError as e:
            errors.append(scan_error(src, "scan", "unusable source", str(e), salt, hash_paths))
            rejected.append(src)
            continue
        except Exception as e:  # noqa: BLE001 - a damaged file of any format: record it, go on
            errors.append(scan_error(src, "scan", "unreadable", f"{type(e).__name__}: {str(e)[:200]}",
                                     salt, hash_paths))
            rejected.append(src)
            continue
        if names:
            label_names[src] = names
        for row in found:
            rows.append(row)
            identity = row.pop("identity")
            if hash_paths:  # the readable map beside the dataset: image hash -> "<source>#<locator>"
                paths.append({"source_hash": row["source_hash"], "path": identity})
            n_rows += 1
            if len(rows) >= ROWS_PER_PART:
                flush()
    for path, reason, detail in [*task.problems, *walker.problems]:
        errors.append(scan_error(path, "scan", reason, detail, salt, hash_paths))
        rejected.append(path)
    if hash_paths:
        paths.extend(map_row(src, salt) for src in rejected)
    if rows or paths or batch == 0:
        flush()
    return {"files": n_files, "headers": n_rows, "rows": n_rows, "errors": errors, "label_names": label_names,
            "path_label_names": names_by_path}


# --- convert: each source read once per task ----------------------------------------------------------

def read_nifti(path: str) -> np.ndarray:
    """The whole volume, [z, y, x] (or [y, x])."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(path))


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


def stored_image(arr: np.ndarray) -> np.ndarray:
    """One image as stored: RGB(A) to luma, 2-D, an integer dtype."""
    from .pixels import luma

    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = luma(np.ascontiguousarray(arr[..., :3]))
    if arr.ndim != 2:
        raise SourceError(f"expected a 2-D image, got shape {arr.shape}")
    return np.ascontiguousarray(_integral(arr, "image"))


def read_images(source: str, locators: list[str]) -> dict[str, np.ndarray | Exception]:
    """{locator: stored image, or the exception that image raised} for images of one source file, the
    file read once: an .npz member array once, a NIfTI volume once. Raises when the file as a whole
    cannot be read."""
    fmt = source_format(source)
    out: dict[str, np.ndarray | Exception] = {}

    def take(stack: np.ndarray, locator: str, index: str) -> None:
        try:
            out[locator] = stored_image(np.array(stack if stack.ndim == 2 else stack[int(index)]))
        except (SourceError, IndexError, ValueError) as e:
            out[locator] = e

    if fmt == "npz":
        by_member: dict[str, list[str]] = {}
        for loc in locators:
            split, _, index = loc.rpartition("/")
            by_member.setdefault(f"{split}_images" if split else "images", []).append(loc)
        with np.load(source) as archive:
            for member, locs in by_member.items():
                if member not in archive:
                    out.update({loc: SourceError(f"no array {member!r} in the archive") for loc in locs})
                    continue
                stack = archive[member]  # the member decompressed once for all of this task's images
                for loc in locs:
                    take(stack, loc, loc.rpartition("/")[2])
                del stack
    elif fmt == "npy":
        stack = np.load(source, mmap_mode="r")
        for loc in locators:
            take(stack, loc, loc)
    elif fmt == "nifti":
        volume = read_nifti(source)
        for loc in locators:
            take(volume, loc, loc.split("/")[-1])
        del volume
    elif fmt == "image":
        from PIL import Image

        with Image.open(source) as im:
            arr = np.array(im)
        for loc in locators:
            try:
                out[loc] = stored_image(arr)
            except SourceError as e:
                out[loc] = e
    else:
        raise SourceError("not a .npz, .npy, .png, .tif(f) or .nii(.gz) file")
    return out


def write_images(writer, specs: list[dict], *, modality: str, salt: str, hash_paths: bool,
                 units: str | None) -> list[dict]:
    """Write a shard's non-DICOM images (`specs`: its plan slice list, in write order) to `writer`;
    returns the error rows of the images that failed. Images are read grouped by source file (each
    file once), then written in the plan's order."""
    from shards import SampleMeta, sample_key

    from .scan import scan_error, text_path

    by_source: dict[str, list[str]] = {}
    for spec in specs:
        source, locator = split_identity(text_path(spec["path"]))
        by_source.setdefault(source, []).append(locator)
    images: dict[str, np.ndarray | Exception] = {}
    for source, locators in by_source.items():
        try:
            found = read_images(source, locators)
        except Exception as e:  # noqa: BLE001 - the whole file failed: each of its images is an error
            found = {loc: e for loc in locators}
        images.update({f"{source}#{loc}": got for loc, got in found.items()})
    errors = []
    for spec in specs:
        identity = text_path(spec["path"])
        pixels = images.pop(identity, None)
        if not isinstance(pixels, np.ndarray):
            e = pixels if pixels is not None else SourceError("image not found in its source")
            errors.append(scan_error(identity, "convert", "unreadable image",
                                     f"{type(e).__name__}: {str(e)[:200]}", salt, hash_paths))
            continue
        meta = SampleMeta(modality=modality, split=spec["split"], source_hash=spec["source_hash"],
                          sop_hash=spec["sop_hash"], series_hash=spec["series_hash"], study_hash=spec["study_hash"],
                          patient_hash=spec["patient_hash"], photometric="MONOCHROME2",
                          bits_stored=pixels.dtype.itemsize * 8, bits_allocated=pixels.dtype.itemsize * 8,
                          pixel_representation=int(pixels.dtype.kind == "i"),
                          units=units or "raw")  # "raw" unless the user vouches for Hounsfield units
        labels = np.asarray(spec["labels"], np.float32) if spec["labels"] is not None else None
        writer.write(sample_key(spec["path"], 0, salt), pixels, meta, labels=labels)
    return errors


def read_nifti_volume(path: str) -> tuple[np.ndarray, dict]:
    """(voxels (depth, rows, cols) in their integer type, geometry {spacing [z, y, x], direction,
    origin}) of a 3-D NIfTI file, as SimpleITK reads it (its qform/sform, scl_slope/scl_inter applied)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise SourceError(f"expected a 3-D scalar volume, got {image.GetDimension()}-D with "
                          f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    voxels = np.ascontiguousarray(_integral(sitk.GetArrayFromImage(image), "volume"))
    return voxels, {"spacing": list(image.GetSpacing())[::-1], "direction": list(image.GetDirection()),
                    "origin": list(image.GetOrigin())}


def write_volumes(writer, specs: list[dict], *, modality: str, salt: str, hash_paths: bool,
                  units: str | None) -> list[dict]:
    """Write a volumes shard's NIfTI volumes (`specs`: its plan rows, one per file) to `writer`, each
    file read once; returns the error rows of the files that failed."""
    from shards import SampleMeta, sample_key

    from .scan import scan_error, text_path

    errors = []
    for spec in specs:
        identity = text_path(spec["path"])
        try:
            voxels, geometry = read_nifti_volume(split_identity(identity)[0])
        except SourceError as e:  # readable, but not a volume stored losslessly (e.g. fractional values)
            errors.append(scan_error(identity, "convert", "unusable volume", str(e)[:200], salt, hash_paths))
            continue
        except Exception as e:  # noqa: BLE001 - a damaged file: recorded, the task goes on
            errors.append(scan_error(identity, "convert", "unreadable image",
                                     f"{type(e).__name__}: {str(e)[:200]}", salt, hash_paths))
            continue
        bits = voxels.dtype.itemsize * 8
        meta = SampleMeta(modality=modality, split=spec["split"], source_hash=spec["source_hash"],
                          series_hash=spec["series_hash"], study_hash=spec["study_hash"],
                          patient_hash=spec["patient_hash"], photometric="MONOCHROME2", bits_stored=bits,
                          bits_allocated=bits, pixel_representation=int(voxels.dtype.kind == "i"),
                          pixel_spacing=geometry["spacing"][1:], units=units or "raw", **geometry)
        labels = np.asarray(spec["labels"], np.float32) if spec["labels"] is not None else None
        writer.write(sample_key(spec["path"], 0, salt), voxels, meta, labels=labels)
        del voxels
    return errors
