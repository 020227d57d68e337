"""`shards verify`: every member of every committed shard against its manifest part and index.

Per shard: the whole tar's checksum and size (catches any flipped byte, padding included), then the tar's
own headers, the DALI index and every member's offset, size and checksum (says where the damage is).
Per dataset: `dataset.json` against the manifests; uncommitted shards and stray temporaries as warnings.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .checksum import crc32
from .dataset import Dataset, ShardFiles, shard_table_problems, summarize
from .index import read_index
from .layout import DATASET_JSON, MANIFEST_DIR, SHARDS_DIR, TMP_MARK
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


def verify_shard(root: Path, shard: ShardFiles) -> list[str]:
    where = f"{shard.modality}/{shard.name}"
    if not shard.tar.exists():
        return [f"{where}: tar missing ({shard.tar})"]
    if not shard.idx.exists():
        return [f"{where}: index missing ({shard.idx})"]
    part = root / MANIFEST_DIR / f"modality={shard.modality}" / f"{shard.name}.parquet"
    table = pq.read_table(part)
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
    all_shards = [s for m in ds.modalities for s in ds.shards(m)]
    iterator = all_shards
    if progress:
        from tqdm import tqdm

        iterator = tqdm(all_shards, desc="verify", unit="shard")
    for shard in iterator:
        report.problems.extend(verify_shard(root, shard))
        report.shards += 1
        report.samples += shard.samples

    committed = {(s.modality, s.name) for s in all_shards}
    shard_dir = root / SHARDS_DIR
    if shard_dir.is_dir():
        for tar in sorted(shard_dir.glob("*/*.tar")):
            if (tar.parent.name, tar.stem) not in committed:
                report.warnings.append(f"{tar.parent.name}/{tar.stem}: tar without manifest part (uncommitted; rerunning ingest redoes it)")
    strays = [p for p in root.rglob(f"*{TMP_MARK}*")]
    if strays:
        report.warnings.append(f"{len(strays)} temporary file(s) left by interrupted writers, e.g. {strays[0].relative_to(root)}")

    if (root / DATASET_JSON).exists():
        recorded = ds.info
        actual = summarize(root, per_sample=True)  # counts rows: checks the footer summaries too
        for name, numbers in actual["modalities"].items():
            rec = recorded.get("modalities", {}).get(name, {})
            for k in ("samples", "train", "val", "test", "shards"):
                if rec.get(k, 0) != numbers[k]:
                    report.problems.append(f"dataset.json: {name}.{k} is {rec.get(k)}, manifests give {numbers[k]}")
        extra = set(recorded.get("modalities", {})) - set(actual["modalities"])
        if extra:
            report.problems.append(f"dataset.json lists modalities without shards: {sorted(extra)}")
    else:
        report.warnings.append("dataset.json missing (ingestion not finalized)")
    report.problems.extend(shard_table_problems(root))
    return report
