"""Phase 1, scan: list the sources in parallel and read DICOM headers (never pixels) into the inventory.

The client only expands the top few folder levels until there are enough folders to keep every worker
busy (`scan_tasks`); each Dask task then walks its own folders recursively and reads the headers of
what it finds (`run_scan_task`), writing one inventory part. Nobody walks 100 M paths serially.

The inventory keeps per file: the salted hash of the source path (its clear path only with `--keep-paths`:
by default the scan tasks write hash -> path into the map beside the dataset, `ingest.paths`),
size, salted hashes of SOP/series/study instance UIDs and of the patient ID, modality code, SOP class,
geometry (rows, columns, frames, samples), bits, photometric interpretation, transfer syntax, where the
pixel data element starts and its declared length. It never keeps names, IDs, dates, accession numbers,
institution/physician names or free text.
"""
from __future__ import annotations

import errno
import itertools
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from shards.layout import INVENTORY_DIR  # noqa: F401  (ingest modules import it from here)

WORK_DIR = "_work"  # hidden from pyarrow discovery; removed when a generation completes; never holds paths

INVENTORY_SCHEMA = pa.schema([
    ("source", pa.string()),            # path / URL with --keep-paths; "" by default (hashed)
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
# Non-DICOM sources (ingest.arrays) write inventory parts with these extra columns (DICOM parts have none;
# planning reads them as null): the image's own split (a MedMNIST .npz's train / val / test, kept by plan)
# and the labels found with it (the .npz's `{split}_labels`, or a `--labels` table keyed by path).
INVENTORY_EXTENSION = pa.schema([
    ("split", pa.string()),
    ("labels", pa.list_(pa.float32())),
])

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
    return {"source": source, "stage": stage, "reason": reason, "detail": readable(detail)[:500]}


def readable(text: str) -> str:
    """`text` as Parquet's UTF-8 columns take it: file-name bytes that are not UTF-8 (held by Python
    as surrogate escapes) written as escapes instead of failing the write."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ---------------------------------------------------------------- paths as text
# File names are bytes; Python holds the ones that are not UTF-8 as surrogate escapes ('\udcff'), which
# Parquet's string columns refuse. Paths therefore travel through the inventory, the plan and errors/
# as *path text*: the path itself when it is valid UTF-8, else each undecodable byte written as NUL and
# two hex digits. NUL never occurs in a file name or URL, so the form is lossless and unambiguous.

_ESCAPED_BYTE = re.compile("\x00([0-9a-f]{2})")


def path_text(path: str) -> str:
    """The stored form of a path (see above); the identity on valid UTF-8 and on path text."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "".join(f"\x00{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in path)


def text_path(text: str) -> str:
    """The path `path_text` stored, as the str that os functions open (surrogate escapes)."""
    if "\x00" not in text:
        return text
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m[1], 16)), text)


# ---------------------------------------------------------------- listing

def _is_url(src: str) -> bool:
    return "://" in src and not src.startswith("file://")


def _local(src: str) -> str:
    return src[len("file://"):] if src.startswith("file://") else src


SYMLINK_LOOP = "symlink loop"


@dataclass
class Walker:
    """Lists and walks source folders, each real folder once, whatever the symbolic links.

    A link to a folder inside a source folder is not followed: that folder is walked under its own path
    anyway (no file twice, no exponential walk through "diamonds" of links), and a link to a folder
    that contains it is recorded as a "symlink loop". A link leading outside the sources is followed;
    below it every folder is identified by (device, inode), so that a folder reached again through
    other links is walked only once per scan task and a cycle is recorded as a loop. Links that cannot
    be resolved are recorded ("broken link", or "symlink loop" for ELOOP); so are unreadable folders.
    `problems` holds (path, reason, detail) of all of these. Folders in `exclude` (normalised paths:
    the dataset being written, when it lies inside a source) are skipped."""

    roots: tuple[str, ...] = ()                       # real paths of the local source folders
    exclude: frozenset[str] = frozenset()
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    visited: set[tuple[int, int]] = field(default_factory=set)  # folders entered below followed links

    @classmethod
    def for_sources(cls, sources: list[str], exclude: frozenset[str] = frozenset()) -> "Walker":
        local = [_local(s) for s in sources if not _is_url(s)]
        return cls(roots=tuple(sorted({os.path.realpath(s) for s in local if os.path.isdir(s)})), exclude=exclude)

    def problem(self, path: str, reason: str, detail: str | BaseException) -> None:
        if isinstance(detail, BaseException):
            detail = f"{type(detail).__name__}: {detail}"
        self.problems.append((path, reason, detail))

    def listing(self, src: str) -> tuple[list[str], list[str], list[str]]:
        """(files, folders, links to folders) directly inside `src`, sorted; hidden entries skipped;
        OSError when `src` itself cannot be listed."""
        files, dirs, links = [], [], []
        if _is_url(src):
            import fsspec

            fs, path = fsspec.core.url_to_fs(src)
            proto = src.split("://", 1)[0]
            for entry in fs.ls(path, detail=True):
                name = entry["name"].rstrip("/")
                if name.rsplit("/", 1)[-1].startswith("."):
                    continue
                (dirs if entry["type"] == "directory" else files).append(f"{proto}://{name}")
            return sorted(files), sorted(dirs), links
        with os.scandir(_local(src)) as it:
            for e in it:
                if e.name.startswith(".") or self.exclude and os.path.normpath(e.path) in self.exclude:
                    continue
                try:
                    if e.is_symlink():
                        mode = os.stat(e.path).st_mode  # follows the link: raises when it leads nowhere
                        if stat.S_ISDIR(mode):
                            links.append(e.path)
                        elif stat.S_ISREG(mode):
                            files.append(e.path)
                    elif e.is_dir(follow_symlinks=False):
                        dirs.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        files.append(e.path)
                except OSError as err:
                    if err.errno == errno.ELOOP:
                        self.problem(e.path, SYMLINK_LOOP, "the link cannot be resolved: too many levels of links")
                    elif e.is_symlink():
                        self.problem(e.path, "broken link", f"the link leads nowhere: {err.strerror}")
                    else:
                        self.problem(e.path, "unreadable", err)
        return sorted(files), sorted(dirs), sorted(links)

    def follow(self, link: str, parent: str) -> bool:
        """Whether to walk the folder `link` (a symbolic link inside folder `parent`) leads to."""
        target, here = os.path.realpath(link), os.path.realpath(parent)
        if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
            self.problem(link, SYMLINK_LOOP, "the link leads to a folder that contains it; not followed")
            return False
        for root in self.roots:
            if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
                inside = target[len(root):].split(os.sep)
                if not any(part.startswith(".") for part in inside):
                    return False  # walked under its own path (hidden folders are not: follow those)
        return True

    def walk(self, folder: str, linked: bool = False, ancestors: frozenset = frozenset()) -> Iterator[str]:
        """Every file below `folder`; `linked`: the folder was reached through a followed link."""
        if linked:
            try:
                st = os.stat(_local(folder))
            except OSError as e:
                self.problem(folder, "unreadable folder", e)
                return
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                self.problem(folder, SYMLINK_LOOP,
                             "the links lead back to a folder that contains this one; not followed")
                return
            if key in self.visited:
                return  # reached before through another link: walked once
            self.visited.add(key)
            ancestors = ancestors | {key}
        try:
            files, dirs, links = self.listing(folder)
        except OSError as e:
            self.problem(folder, "unreadable folder", e)
            return
        yield from files
        linked_dirs = set(links)
        for d in sorted(dirs + links):
            if d not in linked_dirs:
                yield from self.walk(d, linked, ancestors)
            elif self.follow(d, folder):
                yield from self.walk(d, True, ancestors)


def _walk(src: str) -> Iterator[str]:
    yield from Walker.for_sources([src]).walk(src)


@dataclass
class ScanTask:
    index: int
    walk: list[str] = field(default_factory=list)    # folders to walk recursively
    files: list[str] = field(default_factory=list)   # files found by the client
    links: list[str] = field(default_factory=list)   # links to folders outside the sources, to walk
    roots: tuple[str, ...] = ()                       # real paths of the source folders (Walker)
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # found by the client

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


def scan_tasks(sources: list[str], target_tasks: int, files_per_task: int, max_depth: int = 4,
               exclude: frozenset[str] = frozenset()) -> list[ScanTask]:
    """Split the sources into scan tasks by expanding only the top folder levels on the client;
    `exclude`: folders never listed (Walker)."""
    loose: list[str] = []
    frontier: list[str] = []
    for src in sources:
        if not _exists(src):
            raise FileNotFoundError(f"source not found: {src}")
        (frontier if _is_dir(src) else loose).append(src)
    walker = Walker.for_sources(sources, exclude)
    links: list[str] = []  # links to folders outside the sources: walked by the tasks, not expanded here
    depth = 0
    # several folders per task, dealt out round-robin: exports are skewed (a 1000-slice CT series next
    # to 2-slice X-ray studies) and neighbouring folders tend to be alike, so each task gets a fair mix
    while frontier and len(frontier) < FOLDERS_PER_TASK * target_tasks and depth < max_depth:
        nxt: list[str] = []
        for d in frontier:
            try:
                files, dirs, found = walker.listing(d)
            except OSError as e:
                walker.problem(d, "unreadable folder", e)
                continue
            loose.extend(files)
            nxt.extend(dirs)
            links.extend(link for link in found if walker.follow(link, d))
        frontier, depth = nxt, depth + 1
    tasks: list[ScanTask] = []
    loose = sorted(set(loose))
    # loose files in chunks small enough to spread over the workers, large enough to amortise a task
    per = min(files_per_task, max(64, -(-len(loose) // max(1, target_tasks))))
    for i in range(0, len(loose), per):
        tasks.append(ScanTask(len(tasks), files=loose[i:i + per], roots=walker.roots))
    frontier, links = sorted(set(frontier)), sorted(set(links))
    n_walks = min(len(frontier) + len(links), max(1, target_tasks))
    for j in range(n_walks):
        tasks.append(ScanTask(len(tasks), walk=frontier[j::n_walks], links=links[j::n_walks], roots=walker.roots))
    if walker.problems:  # the client's findings are recorded by a task, which knows how to show paths
        if not tasks:
            tasks.append(ScanTask(0, roots=walker.roots))
        tasks[0].problems = walker.problems
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
        if has_pixels and length < 0 and ts != DEFLATED and frames > 1:
            from .decoders import check_fragment_count  # encapsulated: frames vs fragments present

            check_fragment_count(fp, offset, frames)
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
    source_hash = salted_hash(path_text(src), salt)
    return {
        "source": "" if hash_paths else path_text(src),
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


def write_inventory_part(root: str, generation: int, task_index: int, batch: int, rows: list[dict], schema: pa.Schema,
                         paths: list[dict], hash_paths: bool) -> None:
    """One batch of a scan task's inventory rows, and (hashing paths) their rows of the path map beside the
    dataset (ingest.paths)."""
    from shards.atomic import write_parquet_atomically

    from .paths import generation_map_part, write_map

    write_parquet_atomically(pa.Table.from_pylist(rows, schema=schema), part_path(Path(root), generation, task_index, batch))
    if hash_paths:
        write_map(generation_map_part(root, generation, task_index, batch), paths)


def task_sources(task: ScanTask, exclude) -> tuple[Walker, Iterator[str]]:
    """A scan task's files: those given, then its folders walked (symlink-safe, each real folder once);
    and the walker, whose `problems` (unreadable folders, loops) are known once the files are consumed."""
    walker = Walker(roots=tuple(task.roots), exclude=exclude)
    walked = itertools.chain(itertools.chain.from_iterable(walker.walk(d) for d in task.walk),
                             itertools.chain.from_iterable(walker.walk(d, linked=True) for d in task.links))
    return walker, itertools.chain(task.files, walked)


def run_scan_task(task: ScanTask, root: str, generation: int, salt: str, hash_paths: bool,
                  exclude: frozenset[str] = frozenset()) -> dict:
    """Dask task: walk + read headers, write inventory parts (and, with `hash_paths`, the matching parts
    of the path map beside the dataset: hash -> path of every file read and every source rejected).
    Its rejections go into error parts beside the dataset (merged into errors/ by ingest.plan
    merge_scan_errors: overlapping sources reject a file twice), with `hash_paths` their map rows too.
    Returns counts only: the client never holds per-file rows."""
    from .paths import generation_map_dir, write_map
    from .plan import scan_error_part, write_scan_error_part

    rows, errors, paths = [], [], []
    rejected: list[str] = []  # sources of the unwritten error rows, for the map
    n_files = n_rows = batch = error_batch = n_errors = 0

    def flush_errors() -> None:
        nonlocal errors, rejected, error_batch, n_errors
        write_scan_error_part(scan_error_part(root, generation, task.index, error_batch), errors)
        if hash_paths:  # every errors/ row can be resolved
            write_map(generation_map_dir(root, generation) / "map" / f"rejected-{task.index:05d}-{error_batch:03d}.parquet",
                      [map_row(src, salt) for src in rejected])
        n_errors += len(errors)
        errors, rejected, error_batch = [], [], error_batch + 1

    def flush() -> None:
        nonlocal rows, paths, batch
        write_inventory_part(root, generation, task.index, batch, rows, INVENTORY_SCHEMA, paths, hash_paths)
        rows, paths, batch = [], [], batch + 1

    walker, sources_of_task = task_sources(task, exclude)
    for src in sources_of_task:
        n_files += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns about every odd value; rejections say why
                row = read_header(src, salt, hash_paths)
        except Rejected as e:
            errors.append(scan_error(src, "scan", e.reason, e.detail, salt, hash_paths))
            rejected.append(src)
            continue
        except Exception as e:  # an exotic file must not fail the whole task: record it, go on
            errors.append(scan_error(src, "scan", "header unreadable", f"{type(e).__name__}: {str(e)[:200]}",
                                     salt, hash_paths))
            rejected.append(src)
            continue
        rows.append(row)
        n_rows += 1
        if hash_paths:
            paths.append({"source_hash": row["source_hash"], "path": path_text(src)})  # = map_row(src, salt)
        if len(rows) >= ROWS_PER_PART:
            flush()
        if len(errors) >= ROWS_PER_PART:
            flush_errors()
    for path, reason, detail in [*task.problems, *walker.problems]:
        errors.append(scan_error(path, "scan", reason, detail, salt, hash_paths))
        rejected.append(path)
    if errors:
        flush_errors()
    if rows or paths or batch == 0:
        flush()
    return {"files": n_files, "headers": n_rows, "errors": n_errors}


def _shown(src: str, salt: str, hash_paths: bool) -> str:
    """How a source appears in errors/: its path text, or the salted hash of that with `hash_paths`."""
    if not hash_paths:
        return path_text(src)
    from shards import salted_hash

    return "sha:" + salted_hash(path_text(src), salt)


shown_source = _shown


def map_row(src: str, salt: str) -> dict:
    """The path map's row of a source: the hash errors/ shows for it (without 'sha:') -> its path text."""
    from shards import salted_hash

    return {"source_hash": salted_hash(path_text(src), salt), "path": path_text(src)}

# anything in an error text that looks like an absolute path or a URL (it may name another file or folder)
_PATH_LIKE = re.compile(r"""(?<![\w.])(?:[A-Za-z][\w+.-]*://|/)[^\s'"]+""")


def scrubbed(detail: str, src: str, hash_paths: bool) -> str:
    """An error detail fit for errors/: with `hash_paths`, the source's path and every folder above it
    (as written, as path text and as Python quotes it in exception texts), then anything else that
    looks like a path, replaced by <path>. Exception texts (OSError above all) carry paths."""
    if not hash_paths:
        return detail
    forms: set[str] = set()
    path = text_path(src)
    while path not in ("", os.sep, "file:"):
        forms.update((path, path_text(path), repr(path)[1:-1], os.path.basename(path)))
        parent = os.path.dirname(path.rstrip(os.sep))
        if parent == path:
            break
        path = parent
    forms = {f for f in forms if len(f) > 2}
    if forms:  # whole names only ("work" stays in "network"), the longest form first
        alternatives = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
        detail = re.sub(rf"(?<!\w)(?:{alternatives})(?!\w)", "<path>", detail)
    # a path replaced piecewise (a folder above the source, then the rest) still reads as one path
    return re.sub("(?:<path>)+", "<path>", _PATH_LIKE.sub("<path>", detail))


def scan_error(src: str, stage: str, reason: str, detail: str, salt: str, hash_paths: bool) -> dict:
    """The errors/ row of a rejected source (a path or path text), paths hashed and scrubbed with `hash_paths`."""
    return error_row(_shown(src, salt, hash_paths), stage, reason, scrubbed(detail, src, hash_paths))
