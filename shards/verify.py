"""`shards verify`: every member of every committed shard against its manifest part and index.

Per shard: the whole tar's checksum and size (catches any flipped byte, padding included), then the tar's
own headers, the DALI index and every member's offset, size and checksum (says where the damage is).
Per dataset: no key in two places (found in bounded memory: keys go to 256 bucket files on disk, and
each bucket is sorted on its own), every JSON and Parquet file readable, `dataset.json` present and
matching the manifests; uncommitted shards and stray temporaries as warnings.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .checksum import crc32
from .dataset import Dataset, ShardFiles, summarize
from .index import read_index
from .keys import KEY_HEX
from .layout import (DATASET_JSON, ERRORS_DIR, INVENTORY_DIR, MANIFEST_DIR, SHARDS_DIR, STATS_DIR, TMP_MARK, idx_path,
                     tar_path)
from .manifest import TAR_CRC32_META, TAR_SIZE_META


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

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
    """Every sample key of the dataset, spread over 256 files by its first byte, to find duplicates.

    Holds 8 bytes per key on disk (the key's first 64 bits) and one bucket in memory at a time, so a
    billion samples cost 8 GB of temporary disk and about 32 MB of memory. Equal 64-bit prefixes are
    only candidates: `duplicates` confirms them on the full keys in a second pass over the manifests.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = [open(folder / f"{b:02x}.u64", "wb") for b in range(256)]

    def add(self, keys: list[str]) -> None:
        prefixes = np.array([int(k[:16], 16) for k in keys], dtype=np.uint64)
        buckets = (prefixes >> np.uint64(56)).astype(np.uint8)
        for b in np.unique(buckets):
            prefixes[buckets == b].tofile(self.files[b])

    def candidates(self) -> set[str]:
        """The 16-hex-digit prefixes seen more than once."""
        out = set()
        for f in self.files:
            f.close()
            values = np.sort(np.fromfile(f.name, dtype=np.uint64))
            out.update(f"{int(v):016x}" for v in np.unique(values[1:][values[1:] == values[:-1]]))
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
    for path in sorted([*root.glob("*.json"), *(root / STATS_DIR).glob("*.json"), *(root / "plan").glob("*.json")]):
        try:
            json.loads(path.read_bytes())
        except (ValueError, OSError) as e:
            rel = str(path.relative_to(root))
            problems.append(f"{rel}: not valid JSON ({type(e).__name__}: {e})")
            bad.add(rel)
    return problems, bad


def _unreadable_parquet(root: Path) -> list[str]:
    """Problems for Parquet files outside manifest/ (read in full there) that cannot be read to the end."""
    problems = []
    for folder in (ERRORS_DIR, INVENTORY_DIR, "plan"):
        for path in sorted((root / folder).glob("*.parquet")):
            try:
                for _ in pq.ParquetFile(path).iter_batches(batch_size=1 << 16):
                    pass
            except Exception as e:  # pyarrow raises several types for damaged files; all mean the same here
                problems.append(f"{path.relative_to(root)}: unreadable Parquet ({type(e).__name__}: {e})")
    return problems


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
    part = root / MANIFEST_DIR / f"modality={modality}" / f"{name}.parquet"
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


def verify_shard(root: Path, shard: ShardFiles, table=None) -> list[str]:
    where = f"{shard.modality}/{shard.name}"
    if not shard.tar.exists():
        return [f"{where}: tar missing ({shard.tar})"]
    if not shard.idx.exists():
        return [f"{where}: index missing ({shard.idx})"]
    if table is None:
        table = pq.read_table(root / MANIFEST_DIR / f"modality={shard.modality}" / f"{shard.name}.parquet")
    meta = table.schema.metadata or {}
    rows = table.to_pylist()
    problems = []

    size = shard.tar.stat().st_size
    if TAR_SIZE_META in meta and int(meta[TAR_SIZE_META]) != size:
        problems.append(f"{where}: tar is {size} bytes, manifest says {int(meta[TAR_SIZE_META])}")
    if TAR_CRC32_META in meta and _file_crc32(shard.tar) != int(meta[TAR_CRC32_META]):
        problems.append(f"{where}: tar checksum differs from the manifest (the file was modified)")

    try:
        index = read_index(shard.idx)
    except ValueError as e:
        return problems + [f"{where}: unreadable index: {e}"]
    if len(index) != len(rows):
        problems.append(f"{where}: index lists {len(index)} samples, manifest {len(rows)}")

    try:
        with tarfile.open(shard.tar, "r:") as tf:
            in_tar = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        return problems + [f"{where}: tar headers unreadable: {e}"]
    in_index = [(m.name, m.offset, m.size) for members in index for m in members]
    if in_tar != in_index:
        first = next((i for i, (a, b) in enumerate(zip(in_tar, in_index)) if a != b), min(len(in_tar), len(in_index)))
        problems.append(f"{where}: tar members and index differ from member #{first}")

    with open(shard.tar, "rb") as f:
        for row, members in zip(rows, index):
            key = row["key"]
            by_ext = {m.extension: m for m in members}
            if {m.key for m in members} != {key}:
                problems.append(f"{where}: sample #{row['index']} is {members[0].key} in the index, {key} in the manifest")
                continue
            for ext, off_col, size_col, sum_col in (
                ("json", "json_offset", "json_size", "json_crc32"),
                ("npy", "npy_offset", "npy_size", "npy_crc32"),
            ):
                m = by_ext.get(ext)
                if m is None or (m.offset, m.size) != (row[off_col], row[size_col]):
                    problems.append(f"{where}: {key}.{ext} offset/size differ between index and manifest")
                    continue
                f.seek(m.offset)
                data = f.read(m.size)
                if crc32(data) != row[sum_col]:
                    problems.append(f"{where}: {key}.{ext} checksum mismatch")
                    continue
                if ext == "npy":
                    arr = np.load(io.BytesIO(data), allow_pickle=False)
                    if arr.shape != (row["rows"], row["cols"]) or arr.dtype.name != row["dtype"]:
                        problems.append(f"{where}: {key}.npy is {arr.dtype}{arr.shape}, manifest says {row['dtype']}({row['rows']}, {row['cols']})")
                else:
                    if json.loads(data).get("split") != row["split"]:
                        problems.append(f"{where}: {key}.json split differs from the manifest")
            if row["labels_size"] >= 0:
                m = by_ext.get("labels.npy")
                if m is None or (m.offset, m.size) != (row["labels_offset"], row["labels_size"]):
                    problems.append(f"{where}: {key}.labels.npy offset/size differ between index and manifest")
    return problems


def verify(root: str | os.PathLike, progress: bool = False) -> VerifyReport:
    root = Path(root)
    ds = Dataset(root)
    report = VerifyReport()
    parts = []  # (modality/shard, manifest part) of every committed shard
    for modality in ds.modalities:
        for part in sorted((root / MANIFEST_DIR / f"modality={modality}").glob("*.parquet")):
            parts.append((modality, part))
    iterator = parts
    if progress:
        from tqdm import tqdm

        iterator = tqdm(parts, desc="verify", unit="shard")
    readable, unreadable_manifest = [], False
    with tempfile.TemporaryDirectory(prefix="medswav-verify-keys-") as tmp:
        keys = KeyBuckets(Path(tmp))
        for modality, part in iterator:
            try:
                table = pq.read_table(part)
            except Exception as e:  # truncated, garbage, not Parquet: pyarrow's error types vary
                report.problems.append(f"{part.relative_to(root)}: unreadable Parquet ({type(e).__name__}: {e})")
                unreadable_manifest = True
                continue
            name = part.stem
            shard = ShardFiles(name, modality, tar_path(root, modality, name), idx_path(root, modality, name),
                               table.num_rows)
            report.problems.extend(verify_shard(root, shard, table))
            try:
                keys.add(table.column("key").to_pylist())
            except (ValueError, TypeError):  # a key that is not hex: no sample of ours
                report.problems.append(f"{part.relative_to(root)}: keys that are not {KEY_HEX} hex digits")
            readable.append((f"{modality}/{name}", part))
            report.shards += 1
            report.samples += shard.samples
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
    parquet_problems = _unreadable_parquet(root)
    report.problems.extend(parquet_problems)
    if not (root / DATASET_JSON).exists():
        report.problems.append(f"{DATASET_JSON} missing: the ingestion was not finalized (rerun `python -m ingest`)")
    elif DATASET_JSON not in bad_json and not unreadable_manifest and not parquet_problems:
        recorded = ds.info
        actual = summarize(root)
        for name, numbers in actual["modalities"].items():
            rec = recorded.get("modalities", {}).get(name, {})
            for k in ("samples", "train", "val", "test", "shards"):
                if rec.get(k, 0) != numbers[k]:
                    report.problems.append(f"dataset.json: {name}.{k} is {rec.get(k)}, manifests give {numbers[k]}")
        extra = set(recorded.get("modalities", {})) - set(actual["modalities"])
        if extra:
            report.problems.append(f"dataset.json lists modalities without shards: {sorted(extra)}")
    return report
