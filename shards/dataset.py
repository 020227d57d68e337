"""Reading a dataset folder: summary, manifests, shard files, errors; and writing its summary."""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .layout import DATASET_JSON, ERRORS_DIR, MANIFEST_DIR, errors_path, idx_path, tar_path, temporary
from .manifest import ERRORS_SCHEMA, LABEL_NAMES_META, MANIFEST_SCHEMA, UNITS_META, write_parquet_atomically

FORMAT_NAME = "medswav-shards"
FORMAT_VERSION = 1
CODEC = "npy"


@dataclass(frozen=True)
class ShardFiles:
    name: str
    modality: str
    tar: Path
    idx: Path
    samples: int


class Dataset:
    """A dataset folder as described in shards/FORMAT.md."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no dataset folder at {self.root}")

    @property
    def info(self) -> dict:
        path = self.root / DATASET_JSON
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the ingestion job has not finished (rerun `python -m ingest`)")
        return json.loads(path.read_text())

    @property
    def modalities(self) -> list[str]:
        base = self.root / MANIFEST_DIR
        if not base.is_dir():
            return []
        return sorted(
            p.name.split("=", 1)[1]
            for p in base.iterdir()
            if p.is_dir() and p.name.startswith("modality=") and any(p.glob("*.parquet"))
        )

    def manifest(self, modality: str | None = None, columns: list[str] | None = None) -> pa.Table:
        base = self.root / MANIFEST_DIR
        if modality is not None:
            base = base / f"modality={modality}"
        if not base.is_dir() or not any(base.rglob("*.parquet")):
            schema = MANIFEST_SCHEMA.append(pa.field("modality", pa.string()))
            table = schema.empty_table()
            return table.select(columns) if columns else table
        ds = pads.dataset(base, format="parquet", partitioning="hive" if modality is None else None)
        table = ds.to_table(columns=columns)
        if modality is not None and (columns is None or "modality" in columns):
            table = table.append_column("modality", pa.array([modality] * table.num_rows, pa.string()))
        return table

    def label_names(self) -> list[str]:
        for part in sorted((self.root / MANIFEST_DIR).rglob("*.parquet")):
            meta = pq.read_schema(part).metadata or {}
            names = json.loads(meta.get(LABEL_NAMES_META, b"[]"))
            if names:
                return names
        return []

    def units(self, modality: str) -> set[str]:
        """The distinct pixel units (SampleMeta.units) of a modality's samples, from the manifest parts'
        metadata; "" stands for shards written before units were recorded."""
        found: set[str] = set()
        for part in sorted((self.root / MANIFEST_DIR / f"modality={modality}").glob("*.parquet")):
            meta = pq.read_schema(part).metadata or {}
            found.update(json.loads(meta[UNITS_META]) if UNITS_META in meta else [""])
        return found

    def shards(self, modality: str) -> list[ShardFiles]:
        out = []
        for part in sorted((self.root / MANIFEST_DIR / f"modality={modality}").glob("*.parquet")):
            name = part.stem
            out.append(
                ShardFiles(
                    name, modality, tar_path(self.root, modality, name), idx_path(self.root, modality, name),
                    pq.ParquetFile(part).metadata.num_rows,
                )
            )
        return out

    def errors(self) -> pa.Table:
        base = self.root / ERRORS_DIR
        if not base.is_dir() or not any(base.glob("*.parquet")):
            return ERRORS_SCHEMA.empty_table()
        return pads.dataset(base, format="parquet", schema=ERRORS_SCHEMA).to_table()


def write_errors(root: str | os.PathLike, task_name: str, rows: list[dict]) -> None:
    """Record the inputs one task rejected. A retried task replaces its own file (or removes it)."""
    path = errors_path(Path(root), task_name)
    if not rows:
        path.unlink(missing_ok=True)
        return
    clean = [{f: (None if r.get(f) is None else str(r.get(f))) for f in ERRORS_SCHEMA.names} for r in rows]
    write_parquet_atomically(pa.Table.from_pylist(clean, schema=ERRORS_SCHEMA), path)


def summarize(root: str | os.PathLike) -> dict:
    """Counts per modality and split, recomputed from the committed manifests and tars on disk."""
    ds = Dataset(root)
    modalities = {}
    total_samples = total_bytes = 0
    for modality in ds.modalities:
        table = ds.manifest(modality, columns=["split", "labelled"])
        splits = table.column("split").to_pylist()
        shard_files = ds.shards(modality)
        nbytes = sum(s.tar.stat().st_size for s in shard_files if s.tar.exists())
        modalities[modality] = {
            "samples": len(splits),
            "train": splits.count("train"),
            "val": splits.count("val"),
            "test": splits.count("test"),
            "labelled": int(sum(table.column("labelled").to_pylist())),
            "shards": len(shard_files),
            "bytes": nbytes,
        }
        total_samples += len(splits)
        total_bytes += nbytes
    return {"samples": total_samples, "bytes": total_bytes, "modalities": modalities, "errors": ds.errors().num_rows}


def write_dataset_json(root: str | os.PathLike, **extra) -> dict:
    """Write `dataset.json` from the manifests plus `extra` fields of the caller (atomic)."""
    root = Path(root)
    summary = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "codec": CODEC,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "label_names": Dataset(root).label_names(),
        **summarize(root),
        **extra,
    }
    path = root / DATASET_JSON
    tmp = temporary(path, "summary")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return summary
