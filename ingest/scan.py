"""Phase 1, scan: list the sources in parallel and read DICOM headers (never pixels) into the inventory.

The client only expands the top few folder levels until there are enough folders to keep every worker
busy (`scan_tasks`); each Dask task then walks its own folders recursively and reads the headers of
what it finds (`run_scan_task`), writing one inventory part. Nobody walks 100 M paths serially.

The inventory keeps per file: the source path (audit trail; with `hash_paths` only its salted hash),
size, salted hashes of SOP/series/study instance UIDs and of the patient ID, modality code, SOP class,
geometry (rows, columns, frames, samples), bits, photometric interpretation, transfer syntax, where the
pixel data element starts and its declared length. It never keeps names, IDs, dates, accession numbers,
institution/physician names or free text.
"""
from __future__ import annotations

import itertools
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa

INVENTORY_DIR = "inventory"
WORK_DIR = "_work"  # hidden from pyarrow discovery; removed when a generation completes

INVENTORY_SCHEMA = pa.schema([
    ("source", pa.string()),            # path / URL; "" when hash_paths
    ("source_hash", pa.string()),
    ("size", pa.int64()),
    ("sop_hash", pa.string()),
    ("series_hash", pa.string()),
    ("study_hash", pa.string()),
    ("patient_hash", pa.string()),
    ("modality_code", pa.string()),
    ("sop_class_uid", pa.string()),
    ("rows", pa.int32()),
    ("cols", pa.int32()),
    ("frames", pa.int32()),
    ("samples_per_pixel", pa.int32()),
    ("bits_allocated", pa.int32()),
    ("bits_stored", pa.int32()),
    ("pixel_representation", pa.int32()),
    ("photometric", pa.string()),
    ("transfer_syntax", pa.string()),
    ("lossy", pa.bool_()),
    ("has_pixels", pa.bool_()),
    ("float_pixels", pa.bool_()),
    ("pixel_length", pa.int64()),       # declared length of the pixel data element; -1 undefined/unknown
    ("pixel_end", pa.int64()),          # file offset where that value ends; -1 undefined/unknown
    ("declared_bytes", pa.int64()),     # rows * cols * frames * samples * bits_allocated / 8
    ("native_layout", pa.string()),     # JSON for convert's fast path (ingest.native); null: pydicom path
])
PATHS_SCHEMA = pa.schema([("source_hash", pa.string()), ("path", pa.string())])

LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.4.100",
    "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.103",
}
DEFLATED = "1.2.840.10008.1.2.1.99"
# (implicit VR, little endian) -> the native transfer syntax with that encoding (no implicit big endian)
SYNTAX_OF_ENCODING = {(True, True): "1.2.840.10008.1.2", (False, True): "1.2.840.10008.1.2.1",
                      (False, False): "1.2.840.10008.1.2.2"}
_PIXEL_TAGS = {0x7FE00010: False, 0x7FE00008: True, 0x7FE00009: True}  # tag -> float pixel data


class Rejected(Exception):
    """One input cannot be used: `reason` is a short category, `detail` says exactly why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def error_row(source: str, stage: str, reason: str, detail: str) -> dict:
    return {"source": source, "stage": stage, "reason": reason, "detail": detail[:500]}


# ---------------------------------------------------------------- listing

def _is_url(src: str) -> bool:
    return "://" in src and not src.startswith("file://")


def _local(src: str) -> str:
    return src[len("file://"):] if src.startswith("file://") else src


def _list_dir(src: str) -> tuple[list[str], list[str]]:
    """(files, subfolders) directly inside `src`, sorted; hidden entries skipped."""
    files, dirs = [], []
    if _is_url(src):
        import fsspec

        fs, path = fsspec.core.url_to_fs(src)
        proto = src.split("://", 1)[0]
        for entry in fs.ls(path, detail=True):
            name = entry["name"].rstrip("/")
            if name.rsplit("/", 1)[-1].startswith("."):
                continue
            (dirs if entry["type"] == "directory" else files).append(f"{proto}://{name}")
    else:
        with os.scandir(_local(src)) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=True):
                    dirs.append(e.path)
                elif e.is_file(follow_symlinks=True):
                    files.append(e.path)
    return sorted(files), sorted(dirs)


def _walk(src: str) -> Iterator[str]:
    files, dirs = _list_dir(src)
    yield from files
    for d in dirs:
        yield from _walk(d)


@dataclass
class ScanTask:
    index: int
    walk: list[str] = field(default_factory=list)    # folders to walk recursively
    files: list[str] = field(default_factory=list)   # files found by the client

    @property
    def name(self) -> str:
        return f"scan-{self.index:05d}"


def _is_dir(src: str) -> bool:
    if _is_url(src):
        import fsspec

        fs, path = fsspec.core.url_to_fs(src)
        return fs.isdir(path)
    return os.path.isdir(_local(src))


def _exists(src: str) -> bool:
    if _is_url(src):
        import fsspec

        fs, path = fsspec.core.url_to_fs(src)
        return fs.exists(path)
    return os.path.exists(_local(src))


FOLDERS_PER_TASK = 4


def scan_tasks(sources: list[str], target_tasks: int, files_per_task: int, max_depth: int = 4) -> list[ScanTask]:
    """Split the sources into scan tasks by expanding only the top folder levels on the client."""
    loose: list[str] = []
    frontier: list[str] = []
    for src in sources:
        if not _exists(src):
            raise FileNotFoundError(f"source not found: {src}")
        (frontier if _is_dir(src) else loose).append(src)
    depth = 0
    # several folders per task, dealt out round-robin: exports are skewed (a 1000-slice CT series next
    # to 2-slice X-ray studies) and neighbouring folders tend to be alike, so each task gets a fair mix
    while frontier and len(frontier) < FOLDERS_PER_TASK * target_tasks and depth < max_depth:
        nxt: list[str] = []
        for d in frontier:
            files, dirs = _list_dir(d)
            loose.extend(files)
            nxt.extend(dirs)
        frontier, depth = nxt, depth + 1
    tasks: list[ScanTask] = []
    loose = sorted(set(loose))
    # loose files in chunks small enough to spread over the workers, large enough to amortise a task
    per = min(files_per_task, max(64, -(-len(loose) // max(1, target_tasks))))
    for i in range(0, len(loose), per):
        tasks.append(ScanTask(len(tasks), files=loose[i:i + per]))
    frontier = sorted(set(frontier))
    n_walks = min(len(frontier), max(1, target_tasks))
    for j in range(n_walks):
        tasks.append(ScanTask(len(tasks), walk=frontier[j::n_walks]))
    return tasks


# ---------------------------------------------------------------- headers

def inferred_syntax(ds, pixels_encapsulated: bool) -> str:
    """The transfer syntax of a file whose File Meta Information has none (ACR-NEMA style exports
    without preamble and group 0002): the encoding pydicom read the elements with (implicit VR little
    endian unless the first element carries a valid VR; big endian when its group reads byte-swapped).
    Encapsulated (compressed) Pixel Data says nothing about its codec: rejected."""
    if pixels_encapsulated:
        raise Rejected("unknown transfer syntax", "no Transfer Syntax UID in the file and encapsulated "
                       "(compressed) Pixel Data: the codec cannot be inferred")
    implicit, little = getattr(ds, "original_encoding", (True, True))
    implicit = True if implicit is None else bool(implicit)
    little = True if little is None else bool(little)
    ts = SYNTAX_OF_ENCODING.get((implicit, little))
    if ts is None:
        raise Rejected("unknown transfer syntax", "no Transfer Syntax UID in the file and an impossible encoding")
    return ts


CONTENT_UID_PREFIX = "content-blake2b:"


def content_uid(fp) -> str:
    """Stand-in SOPInstanceUID of a file that has none: BLAKE2b-256 of every byte of the file.
    Identical copies get the same one (so they deduplicate), and it is the same in every run; like a
    real UID it only ever leaves the process as a salted hash (`sop_hash`) or inside sample keys."""
    import hashlib

    digest = hashlib.blake2b(digest_size=32)
    fp.seek(0)
    while chunk := fp.read(1 << 20):
        digest.update(chunk)
    return CONTENT_UID_PREFIX + digest.hexdigest()


def sop_uid(ds, fp) -> str:
    """The SOPInstanceUID that keys a file's samples: its own, else its content's (`content_uid`)."""
    uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    return uid or content_uid(fp)


def set_syntax(ds, ts: str) -> None:
    """Record an inferred transfer syntax where pydicom's decoders and `header_meta` look for it."""
    from pydicom.dataset import FileMetaDataset

    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts


def _open(src: str):
    if _is_url(src):
        import fsspec

        return fsspec.open(src, "rb").open()
    return open(_local(src), "rb")


def _int(ds, name: str, default: int = 0) -> int:
    value = ds.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Rejected("bad header value", f"{name} = {str(value)[:40]!r} is not an integer") from None


def _pixel_element(fp, ds, offset: int, size: int) -> tuple[bool, bool, int, int]:
    """(has_pixels, float_pixels, declared length, end of the value) from the element header at `offset`."""
    if offset >= size:
        return False, False, -1, -1
    fp.seek(offset)
    head = fp.read(12)
    if len(head) < 8:
        return False, False, -1, -1
    implicit, little = getattr(ds, "original_encoding", (False, True))
    implicit = bool(implicit) if implicit is not None else False
    little = True if little is None else bool(little)
    e = "<" if little else ">"
    group, elem = struct.unpack(e + "HH", head[:4])
    tag = (group << 16) | elem
    if tag not in _PIXEL_TAGS:
        return False, False, -1, -1
    if implicit:
        (length,), start = struct.unpack(e + "I", head[4:8]), offset + 8
    elif len(head) >= 12 and head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN"):
        (length,), start = struct.unpack(e + "I", head[8:12]), offset + 12
    else:
        (length,), start = struct.unpack(e + "H", head[6:8]), offset + 8
    if length == 0xFFFFFFFF:
        return True, _PIXEL_TAGS[tag], -1, -1
    return True, _PIXEL_TAGS[tag], int(length), start + int(length)


def read_header(src: str, salt: str, hash_paths: bool, fast: bool = True) -> dict:
    """One inventory row for `src`; raises Rejected for files that are not usable DICOM.
    `fast=False` always parses with pydicom (the reference the fast reader is tested against)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from shards import salted_hash

    from .header import parse_header
    from .native import native_layout

    try:
        fp = _open(src)
    except OSError as e:
        raise Rejected("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
    with fp:
        fp.seek(0, os.SEEK_END)
        size = fp.tell()
        fp.seek(0)
        if size == 0:
            raise Rejected("empty file", "zero bytes")
        ds = parse_header(fp, size) if fast else None  # None: pydicom decides (ingest.header)
        if ds is not None:
            offset = ds.pixel_offset
        else:
            try:
                fp.seek(0)
                try:
                    ds = pydicom.dcmread(fp, stop_before_pixels=True)
                except InvalidDicomError:
                    # no 128-byte preamble / meta header: many old exports; pixels are still recoverable
                    fp.seek(0)
                    ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
                offset = fp.tell()
            except Exception as e:  # pydicom raises many types on garbage
                raise Rejected("not DICOM", f"header unreadable: {type(e).__name__}: {str(e)[:200]}") from None
        if "SOPInstanceUID" not in ds and "Modality" not in ds:
            raise Rejected("not DICOM", "no SOPInstanceUID and no Modality in what could be parsed")
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        try:
            if ts == DEFLATED:
                # the stream position is inside the inflated copy: trust the header, decode will check
                has_pixels, float_pixels, length, end = True, False, -1, -1
            else:
                has_pixels, float_pixels, length, end = _pixel_element(fp, ds, offset, size)
        except (OSError, struct.error):
            has_pixels, float_pixels, length, end = False, False, -1, -1
        if not ts:  # no File Meta Information (or none with a syntax): ds is pydicom's, read with force
            ts = inferred_syntax(ds, pixels_encapsulated=has_pixels and length < 0)
            set_syntax(ds, ts)
        try:
            rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
            frames = max(1, _int(ds, "NumberOfFrames", 1))
            spp = _int(ds, "SamplesPerPixel", 1)
            bits_allocated = _int(ds, "BitsAllocated")
            bits_stored = _int(ds, "BitsStored", bits_allocated)
            pixel_rep = _int(ds, "PixelRepresentation")
            texts = {k: str(ds.get(k, "") or "") for k in (
                "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality",
                "SOPClassUID", "PhotometricInterpretation", "LossyImageCompression")}
        except Rejected:
            raise
        except Exception as e:
            raise Rejected("bad header value", f"{type(e).__name__}: {str(e)[:200]}") from None
        # a file without SOPInstanceUID is keyed by its content; one without pixels is rejected anyway
        uid = sop_uid(ds, fp) if has_pixels else texts["SOPInstanceUID"]
        layout = None
        if has_pixels and not float_pixels and length >= 0:
            try:
                mtime_ns = os.stat(_local(src)).st_mtime_ns if not _is_url(src) else -1
                layout = native_layout(ds, src=src, ts=ts, value_start=end - length, value_length=length,
                                       file_size=size, mtime_ns=mtime_ns, salt=salt, uid=uid)
            except Exception:  # pydicom raises many types on odd values: convert's pydicom path decides
                layout = None
    source_hash = salted_hash(src, salt)
    return {
        "source": "" if hash_paths else src,
        "source_hash": source_hash,
        "size": size,
        "sop_hash": salted_hash(uid, salt),
        "series_hash": salted_hash(texts["SeriesInstanceUID"], salt),
        "study_hash": salted_hash(texts["StudyInstanceUID"], salt),
        "patient_hash": salted_hash(texts["PatientID"], salt),
        "modality_code": texts["Modality"].strip().upper(),
        "sop_class_uid": texts["SOPClassUID"].strip(),
        "rows": rows, "cols": cols, "frames": frames, "samples_per_pixel": spp,
        "bits_allocated": bits_allocated, "bits_stored": bits_stored, "pixel_representation": pixel_rep,
        "photometric": texts["PhotometricInterpretation"].strip().upper(),
        "transfer_syntax": ts,
        "lossy": ts in LOSSY_SYNTAXES or texts["LossyImageCompression"].strip() == "01",
        "has_pixels": has_pixels,
        "float_pixels": float_pixels,
        "pixel_length": length,
        "pixel_end": end,
        "declared_bytes": rows * cols * frames * spp * max(bits_allocated, 1) // 8,
        "native_layout": layout,
    }


ROWS_PER_PART = 20_000  # a task walking a huge folder writes several parts instead of holding everything


def part_path(root: Path, generation: int, task_index: int, batch: int = 0) -> Path:
    return Path(root) / INVENTORY_DIR / f"part-g{generation:03d}-{task_index:05d}-{batch:03d}.parquet"


def paths_part(root: Path, generation: int, task_index: int, batch: int = 0) -> Path:
    return Path(root) / WORK_DIR / f"g{generation:03d}" / "paths" / f"part-{task_index:05d}-{batch:03d}.parquet"


def _walk_logged(src: str, errors: list[dict]) -> Iterator[str]:
    """Like _walk, but an unreadable subfolder becomes an error row instead of ending the walk."""
    try:
        files, dirs = _list_dir(src)
    except OSError as e:
        errors.append(error_row(src, "scan", "unreadable folder", f"{type(e).__name__}: {e}"))
        return
    yield from files
    for d in dirs:
        yield from _walk_logged(d, errors)


def run_scan_task(task: ScanTask, root: str, generation: int, salt: str, hash_paths: bool) -> dict:
    """Dask task: walk + read headers, write inventory parts. Returns counts and error rows."""
    from shards.manifest import write_parquet_atomically

    rows, errors, paths = [], [], []
    n_files = n_rows = batch = 0

    def flush() -> None:
        nonlocal rows, paths, batch
        write_parquet_atomically(pa.Table.from_pylist(rows, schema=INVENTORY_SCHEMA),
                                 part_path(Path(root), generation, task.index, batch))
        if hash_paths:
            write_parquet_atomically(pa.Table.from_pylist(paths, schema=PATHS_SCHEMA),
                                     paths_part(Path(root), generation, task.index, batch))
        rows, paths, batch = [], [], batch + 1

    walked = itertools.chain.from_iterable(_walk_logged(d, errors) for d in task.walk)
    for src in itertools.chain(task.files, walked):
        n_files += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns about every odd value; rejections say why
                row = read_header(src, salt, hash_paths)
        except Rejected as e:
            errors.append(error_row(_shown(src, salt, hash_paths), "scan", e.reason, e.detail))
            continue
        except Exception as e:  # an exotic file must not fail the whole task: record it, go on
            errors.append(error_row(_shown(src, salt, hash_paths), "scan", "header unreadable",
                                    f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        rows.append(row)
        n_rows += 1
        if hash_paths:
            paths.append({"source_hash": row["source_hash"], "path": src})
        if len(rows) >= ROWS_PER_PART:
            flush()
    if rows or batch == 0:
        flush()
    return {"files": n_files, "headers": n_rows, "errors": errors}


def _shown(src: str, salt: str, hash_paths: bool) -> str:
    """How a source appears in errors/: the path, or its salted hash with `hash_paths`."""
    if not hash_paths:
        return src
    from shards import salted_hash

    return "sha:" + salted_hash(src, salt)


shown_source = _shown
