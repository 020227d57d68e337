"""`shards verify`: every member of every committed shard against its manifest part and index.

Per shard, one Dask task (or in-process for small datasets) reading the tar once, front to back: the
whole tar's checksum and size (catches any flipped byte, padding included) from the same reads that parse
the tar's own headers and members, then the DALI index and every member's offset, size and checksum (says
where the damage is). The task sends back its problem lines and the first 64 bits of each key.
Per dataset: no key in two places (found in bounded memory: 8 bytes per key, in memory up to 4 M keys,
beyond that in 256 bucket files on disk, each sorted on its own), every JSON and Parquet file readable, `dataset.json` present and
matching the row counts the tasks send back (the client reads no manifest row), the shard tables matching
the footers the tasks send back; uncommitted shards and stray temporaries as warnings.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from .checksum import crc32
from .dataset import Dataset, shard_table_problems, shard_table_row, split_counts
from .index import read_index
from .keys import KEY_HEX
from .layout import (DATASET_JSON, ERRORS_DIR, INVENTORY_DIR, LABELS_EXT, META_EXT, PIXELS_EXT, PLAN_DIR,
                     SHARDS_DIR, STATS_DIR, TABLE_DIR, TMP_MARK, idx_path, manifest_dir, manifest_path, split_member,
                     tar_path)
from .manifest import KIND_META, SUMMARY_META, TAR_CRC32_META, TAR_SIZE_META
from .sample import KIND_SLICES, KIND_VOLUMES


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tar_bytes_read: int = 0  # bytes read from all tars together (the tars' total size: each read once)
    tar_opens: int = 0       # the most times any one tar was opened (1)

    @property
    def ok(self) -> bool:
        return not self.problems


def _file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = crc32(chunk, crc)
    return crc


class KeyBuckets:
    """Every sample key of the dataset, to find duplicates: the first 64 bits of each key.

    Up to IN_MEMORY_KEYS keys stay in memory (32 MB) and are sorted once; beyond that they spill to 256
    files by their first byte, each sorted on its own later, so a billion samples cost 8 GB of temporary
    disk and about 32 MB of memory. Equal 64-bit prefixes are only candidates: `duplicates` confirms them
    on the full keys in a second pass over the manifests.
    """

    IN_MEMORY_KEYS = 1 << 22

    def __init__(self, folder: Path):
        self.folder = folder
        self.held: list[np.ndarray] = []
        self.held_keys = 0
        self.files = None  # the 256 bucket files, once spilled

    def add_prefixes(self, prefixes: np.ndarray) -> None:
        """prefixes: uint64, the first 64 bits of each key (a shard's, as its check returns them)."""
        self.held.append(prefixes)
        self.held_keys += len(prefixes)
        if self.held_keys > self.IN_MEMORY_KEYS:
            self._spill()

    def _spill(self) -> None:
        if self.files is None:
            self.files = [open(self.folder / f"{b:02x}.u64", "wb") for b in range(256)]
        if not self.held:
            return
        prefixes = np.concatenate(self.held)
        buckets = (prefixes >> np.uint64(56)).astype(np.uint8)
        order = np.argsort(buckets, kind="stable")
        bounds = np.searchsorted(buckets[order], np.arange(257))
        for b in range(256):
            if bounds[b] < bounds[b + 1]:
                prefixes[order[bounds[b]:bounds[b + 1]]].tofile(self.files[b])
        self.held, self.held_keys = [], 0

    @staticmethod
    def _repeated(values: np.ndarray) -> set[str]:
        values = np.sort(values)
        return {f"{int(v):016x}" for v in np.unique(values[1:][values[1:] == values[:-1]])}

    def candidates(self) -> set[str]:
        """The 16-hex-digit prefixes seen more than once."""
        if self.files is None:
            return self._repeated(np.concatenate(self.held)) if self.held else set()
        self._spill()
        out = set()
        for f in self.files:
            f.close()
            out.update(self._repeated(np.fromfile(f.name, dtype=np.uint64)))
            os.unlink(f.name)
        return out


def duplicates(parts: list[tuple[str, Path]], candidates: set[str]) -> list[str]:
    """One problem line per group of shards that share keys (a copied shard gives one line, not 1000)."""
    if not candidates:
        return []
    places: dict[str, list[str]] = {}
    for where, part in parts:
        for key in pq.read_table(part, columns=["key"]).column("key").to_pylist():
            if key[:16] in candidates:
                places.setdefault(key, []).append(where)
    groups: dict[tuple[str, ...], list[str]] = {}
    for key, where in places.items():
        if len(where) > 1:
            groups.setdefault(tuple(sorted(where)), []).append(key)
    return [f"{len(keys)} duplicate key(s) in {', '.join(dict.fromkeys(where))}, e.g. {keys[0]}"
            for where, keys in sorted(groups.items())]


def _unreadable_json(root: Path) -> tuple[list[str], set[str]]:
    """Problems for JSON files of the dataset that do not parse, and the names of those files."""
    problems, bad = [], set()
    for path in sorted([*root.glob("*.json"), *(root / STATS_DIR).glob("*.json"), *(root / PLAN_DIR).glob("*.json")]):
        try:
            json.loads(path.read_bytes())
        except (ValueError, OSError) as e:
            rel = str(path.relative_to(root))
            problems.append(f"{rel}: not valid JSON ({type(e).__name__}: {e})")
            bad.add(rel)
    return problems, bad


def _other_parquet_files(root: Path) -> list[str]:
    """Parquet files outside manifest/ (whose parts the shard tasks read in full), relative to root."""
    return [str(path.relative_to(root)) for folder in (ERRORS_DIR, INVENTORY_DIR, PLAN_DIR, TABLE_DIR)
            for path in sorted((root / folder).glob("*.parquet"))]


class DamagedShardError(ValueError):
    """A shard a reader was about to read is missing or fails its checksum (the message names it)."""


def check_tar(root: str | os.PathLike, modality: str, name: str) -> str | None:
    """The quick check before a shard is read: tar and index present, the tar's size and whole-file
    checksum as its manifest part records them. None when intact, else one line naming the shard."""
    root = Path(root)
    where, tar = f"{modality}/{name}", tar_path(root, modality, name)
    if not tar.exists():
        return f"shard {where}: tar missing ({tar})"
    if not idx_path(root, modality, name).exists():
        return f"shard {where}: index missing ({idx_path(root, modality, name)})"
    part = manifest_path(root, modality, name)
    try:
        meta = pq.read_schema(part).metadata or {}
    except Exception as e:  # pyarrow's error types for a damaged file vary
        return f"shard {where}: manifest part {part} unreadable ({type(e).__name__}: {e})"
    size = tar.stat().st_size
    if TAR_SIZE_META in meta and int(meta[TAR_SIZE_META]) != size:
        return f"shard {where} ({tar}): {size} bytes, its manifest part says {int(meta[TAR_SIZE_META])}"
    if TAR_CRC32_META in meta and _file_crc32(tar) != int(meta[TAR_CRC32_META]):
        return f"shard {where} ({tar}): checksum differs from its manifest part (the file is damaged or was modified)"
    return None


class TarReader:
    """A tar file read front to back exactly once: the whole-file checksum and byte count are taken
    from the same reads that parse the headers and members, so nothing is read twice. Reads land in
    one reused buffer (a fresh 0.5 MB bytes object per slice would cost page faults in Dask workers,
    whose allocator returns such blocks to the kernel at once)."""

    def __init__(self, path: Path):
        self.file = open(path, "rb", buffering=0)
        self.crc = 0
        self.bytes_read = 0
        self.buffer = bytearray(1 << 20)

    def read(self, size: int) -> memoryview:
        """The next `size` bytes (fewer only at the end of the file), valid until the next read."""
        if size > len(self.buffer):
            self.buffer = bytearray(size)
        view = memoryview(self.buffer)[:size]
        got = 0
        while got < size:
            n = self.file.readinto(view[got:])
            if not n:
                break
            got += n
        self.crc = crc32(view[:got], self.crc)
        self.bytes_read += got
        return view[:got]

    def drain(self) -> None:
        """Read what the tar parser left (end-of-archive blocks, record padding) into the checksum."""
        while len(self.read(len(self.buffer))):
            pass

    def close(self) -> None:
        self.file.close()


TAR_BLOCK = 512
# headers that make a tar more than plain ustar (FORMAT.md): pax and GNU long names
EXTENDED_HEADERS = {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                    tarfile.GNUTYPE_LONGLINK}


def _npy_content(data: memoryview) -> tuple[str, tuple[int, ...]]:
    """dtype and shape from an .npy member's header, after checking its length matches them."""
    head = io.BytesIO(bytes(data[:4096]))
    version = np.lib.format.read_magic(head)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(head)
    if dtype.hasobject or len(data) - head.tell() != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{len(data) - head.tell()} data bytes for {dtype}{shape}")
    return dtype.name, tuple(shape)


def _members_of(reader: TarReader, where: str) -> tuple[dict[int, tuple[str, int, int, object]], str | None]:
    """Every file member of the tar in one streaming pass: data offset -> (name, size, checksum, content),
    content being the .npy array's (dtype, shape) or the .json member's (split, depth) (None for other members);
    and a problem line when the headers stop parsing (the members before it are kept)."""
    members, position = {}, 0
    try:
        while True:
            block = reader.read(TAR_BLOCK)
            if len(block) < TAR_BLOCK:
                raise tarfile.ReadError(f"file ends inside a header at byte {position} (no end-of-archive)")
            if not any(block):
                break  # end of archive; what follows is zero padding, read into the checksum by drain()
            info = tarfile.TarInfo.frombuf(bytes(block), "utf-8", "surrogateescape")
            if info.type in EXTENDED_HEADERS:
                raise tarfile.ReadError(f"{info.name}: pax/GNU extended header at byte {position}, not plain ustar")
            position += TAR_BLOCK
            size = info.size if info.isreg() else 0
            data = reader.read(size)
            if len(data) < size:
                raise tarfile.ReadError(f"member {info.name} truncated")
            if info.isreg():
                content = None
                try:
                    extension = split_member(info.name)[1]
                    if extension == PIXELS_EXT:
                        content = _npy_content(data)
                    elif extension == META_EXT:
                        sample_meta = json.loads(bytes(data))
                        content = (sample_meta.get("split"), sample_meta.get("depth", 0))
                except (ValueError, SyntaxError, EOFError, AttributeError) as e:
                    content = e  # reported below only if the checksum matches (else the checksum says it)
                members[position] = (info.name, size, crc32(data), content)
            padding = -size % TAR_BLOCK
            if len(reader.read(padding)) < padding:
                raise tarfile.ReadError(f"member {info.name}'s padding truncated")
            position += size + padding
    except tarfile.TarError as e:
        return members, f"{where}: tar headers unreadable: {e}"
    finally:
        reader.drain()
    return members, None


@dataclass
class ShardSummary:
    """What one shard's check sends back to the client: a few lines and one 8-byte prefix per key."""
    where: str                       # "modality/name"
    part: str                        # manifest part, relative to the dataset folder
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    manifest_ok: bool = True         # False: the part did not read (no keys to compare, dataset.json skipped)
    key_prefixes: np.ndarray | None = None  # uint64, first 64 bits of every key, for the duplicate check
    tar_opens: int = 0               # how often the tar was opened, and how many bytes of it were read
    tar_bytes_read: int = 0
    counts: dict | None = None       # {split: n, "labelled": n} counted over the part's rows
    table_row: dict | None = None    # the shard table row its footer gives (compared with table/<m>.parquet)
    kind: str | None = None          # slices or volumes, as its footer says (parts before version 2: slices)


def verify_shard(root: str | os.PathLike, modality: str, name: str) -> ShardSummary:
    """Every check of one committed shard, its tar read once, as one Dask task (or in-process)."""
    root = Path(root)
    part = manifest_path(root, modality, name)
    where = f"{modality}/{name}"
    out = ShardSummary(where, str(part.relative_to(root)))
    try:
        table = pq.read_table(part)
    except Exception as e:  # truncated, garbage, not Parquet: pyarrow's error types vary
        out.problems.append(f"{out.part}: unreadable Parquet ({type(e).__name__}: {e})")
        out.manifest_ok = False
        return out
    out.samples = table.num_rows
    # dataset.json and the shard table are checked on the client against these counts and this row, so
    # the client never reads a manifest row itself
    out.counts = split_counts(table)
    meta = table.schema.metadata or {}
    out.table_row = shard_table_row(part, meta, table.num_rows, out.counts)
    out.kind = meta.get(KIND_META, KIND_SLICES.encode()).decode()
    if SUMMARY_META in meta:
        footer = json.loads(meta[SUMMARY_META])
        if any(int(footer.get(k, 0)) != n for k, n in out.counts.items()) or int(footer.get("samples", -1)) != out.samples:
            out.problems.append(f"{out.part}: footer summary {footer} disagrees with its rows")
    try:
        out.key_prefixes = np.array([int(k[:16], 16) for k in table.column("key").to_pylist()], dtype=np.uint64)
    except (ValueError, TypeError):  # a key that is not hex: no sample of ours
        out.problems.append(f"{out.part}: keys that are not {KEY_HEX} hex digits")
    try:
        out.problems.extend(_check_shard(root, modality, name, table, out))
    except OSError as e:  # tar or index unreadable (permissions, I/O error): this shard's problem, not the run's
        out.problems.append(f"{where}: unreadable ({type(e).__name__}: {e})")
    return out


def _check_shard(root: Path, modality: str, name: str, table, out: ShardSummary) -> list[str]:
    where, tar, idx = out.where, tar_path(root, modality, name), idx_path(root, modality, name)
    if not tar.exists():
        return [f"{where}: tar missing ({tar})"]
    if not idx.exists():
        return [f"{where}: index missing ({idx})"]
    meta = table.schema.metadata or {}
    rows = table.to_pylist()
    problems = []
    kind = out.kind  # from the footer, read by verify_shard
    if kind not in (KIND_SLICES, KIND_VOLUMES):
        problems.append(f"{out.part}: unknown kind {kind!r}")
    elif any((row.get("depth", 0) > 0) != (kind == KIND_VOLUMES) for row in rows):
        problems.append(f"{out.part}: a shard of {kind} with samples of depth "
                        f"{sorted({row.get('depth', 0) for row in rows})}")

    reader = TarReader(tar)
    out.tar_opens += 1
    try:
        in_tar, headers_unreadable = _members_of(reader, where)
    finally:
        reader.close()
        out.tar_bytes_read += reader.bytes_read
    size = reader.bytes_read
    if TAR_SIZE_META in meta and int(meta[TAR_SIZE_META]) != size:
        problems.append(f"{where}: tar is {size} bytes, manifest says {int(meta[TAR_SIZE_META])}")
    if TAR_CRC32_META in meta and reader.crc != int(meta[TAR_CRC32_META]):
        problems.append(f"{where}: tar checksum differs from the manifest (the file was modified)")

    try:
        index = read_index(idx)
    except ValueError as e:
        return problems + [f"{where}: unreadable index: {e}"]
    if len(index) != len(rows):
        problems.append(f"{where}: index lists {len(index)} samples, manifest {len(rows)}")
    if headers_unreadable:
        return problems + [headers_unreadable]

    tar_order = [(n, off, sz) for off, (n, sz, _, _) in in_tar.items()]  # dicts keep the tar's order
    in_index = [(m.name, m.offset, m.size) for members in index for m in members]
    if tar_order != in_index:
        first = next((i for i, (a, b) in enumerate(zip(tar_order, in_index)) if a != b),
                     min(len(tar_order), len(in_index)))
        problems.append(f"{where}: tar members and index differ from member #{first}")

    for row, members in zip(rows, index):
        key = row["key"]
        by_ext = {m.extension: m for m in members}
        if {m.key for m in members} != {key}:
            problems.append(f"{where}: sample #{row['index']} is {members[0].key} in the index, {key} in the manifest")
            continue
        for ext, off_col, size_col, sum_col in (
            (META_EXT, "json_offset", "json_size", "json_crc32"),
            (PIXELS_EXT, "npy_offset", "npy_size", "npy_crc32"),
        ):
            m = by_ext.get(ext)
            if m is None or (m.offset, m.size) != (row[off_col], row[size_col]):
                problems.append(f"{where}: {key}.{ext} offset/size differ between index and manifest")
                continue
            member = in_tar.get(m.offset)
            if member is None or member[1] != m.size or member[2] != row[sum_col]:
                problems.append(f"{where}: {key}.{ext} checksum mismatch")
                continue
            content = member[3]
            depth = row.get("depth", 0)  # absent in parts written before format version 2
            if ext == PIXELS_EXT:
                shape = (depth, row["rows"], row["cols"]) if depth else (row["rows"], row["cols"])
                if content != (row["dtype"], shape):
                    found = f"{content[0]}{content[1]}" if isinstance(content, tuple) else f"unreadable ({content})"
                    problems.append(f"{where}: {key}.npy is {found}, manifest says {row['dtype']}{shape}")
            elif not isinstance(content, tuple) or content[0] != row["split"]:
                problems.append(f"{where}: {key}.json split differs from the manifest")
            elif content[1] != depth:
                problems.append(f"{where}: {key}.json depth is {content[1]}, manifest says {depth}")
        if row["labels_size"] >= 0:
            m = by_ext.get(LABELS_EXT)
            if m is None or (m.offset, m.size) != (row["labels_offset"], row["labels_size"]):
                problems.append(f"{where}: {key}.{LABELS_EXT} offset/size differ between index and manifest")
    return problems


IN_PROCESS_MAX_SHARDS = 8
DEFAULT_WORKERS = 2


@contextmanager
def dask_client(workers: int, scheduler: str | None) -> Iterator[Any]:
    """`scheduler` connects to a running cluster (its workers must import `shards`); otherwise an
    embedded LocalCluster of `workers` single-threaded processes. Not ingest's helper: that one warms
    the DICOM decoders and webdataset on every worker, which verify never uses."""
    import dask
    from distributed import Client, LocalCluster

    dask.config.set({
        "distributed.worker.profile.enabled": False,  # the sampling profiler costs CPU on every worker
        "distributed.admin.tick.interval": "500ms",    # tasks run for a second or more: a slow tick is enough
        "distributed.scheduler.work-stealing": False,
    })
    cluster = None
    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
            client.wait_for_workers(1, timeout=60)
        except (OSError, TimeoutError) as e:
            raise VerifyError(f"cannot reach a Dask scheduler with workers at {scheduler}: {e}") from None
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=40)
        client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


class VerifyError(ValueError):
    """verify could not run at all (no cluster): the command's exit status 2."""


def _not_checked(modality: str, name: str, error: BaseException) -> ShardSummary:
    """A task that failed every retry (its worker died each time, say): one problem line for its shard."""
    return ShardSummary(f"{modality}/{name}", "", problems=[
        f"{modality}/{name}: not checked, its task failed ({type(error).__name__}: {error})"])


def _unordered(function, items: list[tuple], client, progress: bool, desc: str) -> Iterator[tuple[tuple, Any]]:
    """(item, function(*item)) for every item, in any order as they finish: as Dask tasks through
    `client` (a connected distributed.Client) or in this process when client is None. At most a few
    tasks per worker are queued at a time, so the client holds only the results not yet consumed,
    whatever the number of items. A task that failed every retry gives its exception as the result."""
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="file", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with bar:
        if client is None:
            for item in items:
                yield item, function(*item)
                bar.update(1)
            return
        from distributed import as_completed

        window = 4 * max(1, len(client.scheduler_info().get("workers", {})))
        todo = iter(items)
        in_flight = {}  # future -> item; at most `window` entries

        def submit(item):
            fut = client.submit(function, *item, key=f"{desc}-{'/'.join(map(str, item[1:]))}", pure=False)
            in_flight[fut] = item
            return fut

        pending = as_completed([submit(item) for item in islice(todo, window)])
        for fut in pending:
            item = in_flight.pop(fut)
            try:
                result = fut.result()
            except Exception as e:  # noqa: BLE001 - a task that failed every retry: the caller reports it
                result = e
            fut.release()
            yield item, result
            bar.update(1)
            nxt = next(todo, None)
            if nxt is not None:
                pending.add(submit(nxt))


def check_parquet(root: str | os.PathLike, rel: str) -> str | None:
    """None when the Parquet file root/rel reads to the end, else one problem line (a Dask task)."""
    try:
        for _ in pq.ParquetFile(Path(root) / rel).iter_batches(batch_size=1 << 16):
            pass
    except Exception as e:  # pyarrow raises several types for damaged files; all mean the same here
        return f"{rel}: unreadable Parquet ({type(e).__name__}: {e})"
    return None


def verify(root: str | os.PathLike, progress: bool = False, workers: int | None = None,
           scheduler: str | None = None, client=None) -> VerifyReport:
    """Check the dataset at root. Per-shard checks (and the reads of the other Parquet files) run as one
    Dask task per file on an embedded LocalCluster of `workers` processes (default DEFAULT_WORKERS), on
    the cluster at `scheduler`, or through `client` (a connected distributed.Client, left open);
    workers=0, or a dataset of at most IN_PROCESS_MAX_SHARDS shards with neither given, checks in this
    process. Cross-shard checks (duplicate keys, dataset.json, shard tables) run here on what the tasks
    send back: counts, one shard table row per shard and 8 bytes per key (to bucket files on disk)."""
    root = Path(root)
    ds = Dataset(root)
    parts = []  # (modality, manifest part) of every committed shard
    for modality in ds.modalities:
        for part in sorted(manifest_dir(root, modality).glob("*.parquet")):
            parts.append((modality, part))
    in_process = client is None and not scheduler and (
        workers == 0 or (workers is None and len(parts) <= IN_PROCESS_MAX_SHARDS))
    if in_process:
        cluster = nullcontext(None)
    elif client is not None:
        cluster = nullcontext(client)
    else:
        cluster = dask_client(workers or DEFAULT_WORKERS, scheduler)
    with cluster as client:
        return _verify(root, ds, parts, client, progress)


def _verify(root: Path, ds: Dataset, parts: list[tuple[str, Path]], client, progress: bool) -> VerifyReport:
    report = VerifyReport()
    readable, unreadable_manifest = [], False
    totals: dict[str, dict[str, int]] = {}          # modality -> counts over its readable parts
    footer_rows: dict[str, dict[str, dict]] = {}    # modality -> shard -> table row from its footer
    kinds: set[str] = set()                         # the kinds the shards' footers give
    with tempfile.TemporaryDirectory(prefix="medswav-verify-keys-") as tmp:
        keys = KeyBuckets(Path(tmp))
        shard_problems = []  # (shard, its lines): tasks finish in any order, the report lists shards in order
        items = [(str(root), m, part.stem) for m, part in parts]
        for (_, modality, name), summary in _unordered(verify_shard, items, client, progress, "verify"):
            if isinstance(summary, BaseException):
                summary = _not_checked(modality, name, summary)
            if summary.problems:
                shard_problems.append((summary.where, summary.problems))
            report.tar_bytes_read += summary.tar_bytes_read
            report.tar_opens = max(report.tar_opens, summary.tar_opens)
            if not summary.manifest_ok:
                unreadable_manifest = True
                continue
            if summary.key_prefixes is not None:
                keys.add_prefixes(summary.key_prefixes)
            if summary.part:
                readable.append((summary.where, root / summary.part))
                report.shards += 1
                report.samples += summary.samples
            if summary.counts is not None:
                total = totals.setdefault(modality, dict.fromkeys(("samples", "shards"), 0))
                total["samples"] += summary.samples
                total["shards"] += 1
                for k, n in summary.counts.items():
                    total[k] = total.get(k, 0) + n
                footer_rows.setdefault(modality, {})[summary.table_row["shard"]] = summary.table_row
                kinds.add(summary.kind)
        for _, lines in sorted(shard_problems):
            report.problems.extend(lines)
        readable.sort()
        report.problems.extend(duplicates(readable, keys.candidates()))

    committed = {(m, part.stem) for m, part in parts}
    shard_dir = root / SHARDS_DIR
    if shard_dir.is_dir():
        for tar in sorted(shard_dir.glob("*/*.tar")):
            if (tar.parent.name, tar.stem) not in committed:
                report.warnings.append(f"{tar.parent.name}/{tar.stem}: tar without manifest part (uncommitted; rerunning ingest redoes it)")
    strays = [p for p in root.rglob(f"*{TMP_MARK}*")]
    if strays:
        report.warnings.append(f"{len(strays)} temporary file(s) left by interrupted writers, e.g. {strays[0].relative_to(root)}")

    json_problems, bad_json = _unreadable_json(root)
    report.problems.extend(json_problems)
    parquet_problems = []
    for (_, rel), result in _unordered(check_parquet, [(str(root), rel) for rel in _other_parquet_files(root)],
                                        client, progress, "verify-parquet"):
        if isinstance(result, BaseException):
            result = f"{rel}: not checked, its task failed ({type(result).__name__}: {result})"
        if result:
            parquet_problems.append(result)
    report.problems.extend(sorted(parquet_problems))
    if not (root / DATASET_JSON).exists():
        report.problems.append(f"{DATASET_JSON} missing: the ingestion was not finalized (rerun `python -m ingest`)")
    elif DATASET_JSON not in bad_json and not unreadable_manifest and not parquet_problems:
        recorded = ds.info
        for name, numbers in sorted(totals.items()):
            rec = recorded.get("modalities", {}).get(name, {})
            for k in ("samples", "train", "val", "test", "shards"):
                if rec.get(k, 0) != numbers.get(k, 0):
                    report.problems.append(f"dataset.json: {name}.{k} is {rec.get(k)}, manifests give {numbers.get(k, 0)}")
        if len(kinds) > 1:
            report.problems.append(f"{root} holds shards of both kinds {sorted(kinds)}: a dataset holds one kind")
        elif kinds:
            recorded_kind = recorded.get("kind", KIND_SLICES)
            if recorded_kind not in kinds:
                report.problems.append(f"dataset.json: kind is {recorded_kind}, the shards hold {kinds.pop()}")
        extra = set(recorded.get("modalities", {})) - set(totals)
        if extra:
            report.problems.append(f"dataset.json lists modalities without shards: {sorted(extra)}")
    if not parquet_problems and not unreadable_manifest:  # the tables are compared with the manifest footers
        report.problems.extend(shard_table_problems(root, footer_rows))
    return report
