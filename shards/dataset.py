"""Reading a dataset folder: summary, manifests, shard files, errors; and writing its summary."""
from __future__ import annotations

import datetime as _dt
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .atomic import write_parquet_atomically, write_text_atomically
from .layout import (DATASET_JSON, ERRORS_DIR, MANIFEST_DIR, MODALITY_PARTITION, TABLE_DIR, errors_path, idx_path, manifest_dir,
                     modality_of_manifest_dir, table_path, tar_path)
from .manifest import (ERROR_COUNTS_META, ERRORS_SCHEMA, KIND_META, LABEL_NAMES_META, MANIFEST_SCHEMA,
                       SHARD_TABLE_SCHEMA, SUMMARY_META, TAR_CRC32_META, TAR_SIZE_META, UNITS_META, V2_COLUMN_DEFAULTS)
from .sample import KIND_SLICES, KIND_VOLUMES, KINDS, SPLITS

FOOTER_READ_THREADS = 16  # footer reads are small and latency-bound (network filesystems): overlap them

FORMAT_NAME = "medswav-shards"
# Version 2 added volume samples (SampleMeta.depth/spacing/direction/origin, the manifest's depth and
# spacing columns, dataset.json "kind"). A slices dataset stays version 1: readers of version 1 read it
# (the new manifest columns are extra), only a volumes dataset needs a version 2 reader.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CODEC = "npy"


def format_version(kind: str) -> int:
    """The format version a dataset of `kind` is written with."""
    return FORMAT_VERSION if kind == KIND_VOLUMES else 1


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
        info = json.loads(path.read_text())
        version = info.get("format_version", 1)
        if version not in READABLE_VERSIONS:
            raise ValueError(f"{path}: format version {version} is not one this medswav reads {READABLE_VERSIONS}")
        return info

    @property
    def kind(self) -> str:
        """"slices" (2-D samples) or "volumes" (3-D samples): from dataset.json (missing kind: slices);
        before the first dataset.json, from the committed manifest parts (none: slices)."""
        if (self.root / DATASET_JSON).exists():
            kind = self.info.get("kind", KIND_SLICES)
            if kind not in KINDS:
                raise ValueError(f"{self.root / DATASET_JSON}: unknown kind {kind!r}; expected one of {KINDS}")
            return kind
        return shard_kind(self.root) or KIND_SLICES

    @property
    def modalities(self) -> list[str]:
        base = self.root / MANIFEST_DIR
        if not base.is_dir():
            return []
        return sorted(
            modality_of_manifest_dir(p.name)
            for p in base.iterdir()
            if p.is_dir() and modality_of_manifest_dir(p.name) and any(p.glob("*.parquet"))
        )

    def manifest(self, modality: str | None = None, columns: list[str] | None = None) -> pa.Table:
        base = self.root / MANIFEST_DIR if modality is None else manifest_dir(self.root, modality)
        schema = MANIFEST_SCHEMA.append(pa.field(MODALITY_PARTITION, pa.string()))
        if not base.is_dir() or not any(base.rglob("*.parquet")):
            table = schema.empty_table()
            return table.select(columns) if columns else table
        # the full schema: parts written before format version 2 lack its columns and read as nulls there
        ds = pads.dataset(base, format="parquet", partitioning="hive" if modality is None else None,
                          schema=schema if modality is None else MANIFEST_SCHEMA)
        table = ds.to_table(columns=columns)
        for name, default in V2_COLUMN_DEFAULTS.items():
            if name in table.column_names and table.column(name).null_count:
                table = table.set_column(table.column_names.index(name), name,
                                         pc.fill_null(table.column(name), pa.scalar(default, MANIFEST_SCHEMA.field(name).type)))
        if modality is not None and (columns is None or MODALITY_PARTITION in columns):
            table = table.append_column(MODALITY_PARTITION, pa.array([modality] * table.num_rows, pa.string()))
        return table

    def label_names(self) -> list[str]:
        for part in sorted((self.root / MANIFEST_DIR).rglob("*.parquet")):
            meta = pq.read_schema(part).metadata or {}
            names = json.loads(meta.get(LABEL_NAMES_META, b"[]"))
            if names:
                return names
        return []

    def units(self, modality: str) -> set[str]:
        """The distinct pixel units (SampleMeta.units) of a modality's samples: from dataset.json (one small
        read, whatever the number of shards), else from the manifest parts' metadata; "" stands for shards
        written before units were recorded."""
        if (self.root / DATASET_JSON).exists():
            recorded = self.info.get("modalities", {}).get(modality, {}).get("units")
            if recorded is not None:
                return set(recorded)
        found: set[str] = set()
        for part in sorted(manifest_dir(self.root, modality).glob("*.parquet")):
            meta = pq.read_schema(part).metadata or {}
            found.update(json.loads(meta[UNITS_META]) if UNITS_META in meta else [""])
        return found

    def shards(self, modality: str) -> list[ShardFiles]:
        out = []
        for part in sorted(manifest_dir(self.root, modality).glob("*.parquet")):
            name = part.stem
            out.append(
                ShardFiles(
                    name, modality, tar_path(self.root, modality, name), idx_path(self.root, modality, name),
                    pq.ParquetFile(part).metadata.num_rows,
                )
            )
        return out

    def shard_table(self, modality: str) -> pa.Table:
        """One row per committed shard of `modality` (SHARD_TABLE_SCHEMA), sorted by shard name.

        Read from `table/<modality>.parquet` (one small file, written by `write_dataset_json`); a dataset
        written before the table existed is summarised from its manifest footers instead (one footer read
        per shard; `python -m shards reindex DATASET` writes the table).
        """
        path = table_path(self.root, modality)
        if path.exists():
            return pq.read_table(path, schema=SHARD_TABLE_SCHEMA)
        return shard_summaries(self.root, modality)

    def errors(self) -> pa.Table:
        base = self.root / ERRORS_DIR
        if not base.is_dir() or not any(base.glob("*.parquet")):
            return ERRORS_SCHEMA.empty_table()
        return pads.dataset(base, format="parquet", schema=ERRORS_SCHEMA).to_table()


def _counts_by_stage(table: pa.Table) -> dict[str, dict[str, int]]:
    """{stage: {reason: rows}} of an error table, counted by pyarrow (no Python object per row)."""
    out: dict[str, dict[str, int]] = {}
    if table.num_rows:
        grouped = table.group_by(["stage", "reason"]).aggregate([([], "count_all")])
        for stage, reason, n in zip(*(grouped.column(c).to_pylist() for c in ("stage", "reason", "count_all"))):
            out.setdefault(stage, {})[reason] = n
    return out


def write_errors(root: str | os.PathLike, task_name: str, rows: list[dict]) -> None:
    """Record the inputs one task rejected. A retried task replaces its own file (or removes it).

    The file's footer carries its counts by stage and reason, so summaries never read the rows.
    """
    path = errors_path(Path(root), task_name)
    if not rows:
        path.unlink(missing_ok=True)
        return
    clean = [{f: (None if r.get(f) is None else str(r.get(f))) for f in ERRORS_SCHEMA.names} for r in rows]
    table = pa.Table.from_pylist(clean, schema=ERRORS_SCHEMA)
    counts = json.dumps(_counts_by_stage(table), sort_keys=True).encode()
    write_parquet_atomically(table.replace_schema_metadata({ERROR_COUNTS_META: counts}), path)


def _footer_reads(function, items: list) -> list:
    if len(items) < 2 * FOOTER_READ_THREADS:
        return [function(item) for item in items]
    with ThreadPoolExecutor(FOOTER_READ_THREADS) as pool:
        return list(pool.map(function, items))


def _error_file_counts(path: Path) -> dict[str, dict[str, int]]:
    meta = pq.read_metadata(path).metadata or {}
    if ERROR_COUNTS_META in meta:
        return json.loads(meta[ERROR_COUNTS_META])
    # written before the footer counts existed: count this one file's rows
    return _counts_by_stage(pq.read_table(path, columns=["stage", "reason"]))


def error_counts(root: str | os.PathLike) -> dict[str, dict[str, int]]:
    """{stage: {reason: count}} over every error file of the dataset, from the files' footers."""
    base = Path(root) / ERRORS_DIR
    total: dict[str, dict[str, int]] = {}
    if not base.is_dir():
        return total
    for counts in _footer_reads(_error_file_counts, sorted(base.glob("*.parquet"))):
        for stage, reasons in counts.items():
            for reason, n in reasons.items():
                total.setdefault(stage, {})[reason] = total.get(stage, {}).get(reason, 0) + int(n)
    return {stage: dict(sorted(r.items(), key=lambda kv: (-kv[1], kv[0]))) for stage, r in sorted(total.items())}


def _shard_summary(part: Path) -> dict:
    """One shard table row from the manifest part's footer (no rows read, except for old parts)."""
    meta = pq.read_metadata(part)
    return shard_table_row(part, meta.metadata or {}, meta.num_rows)


def split_counts(table: pa.Table) -> dict[str, int]:
    """{split: samples, ..., "labelled": samples} counted over manifest rows."""
    splits = pc.value_counts(table.column("split"))
    by_split = dict(zip(splits.field("values").to_pylist(), splits.field("counts").to_pylist()))
    counts = {s: int(by_split.get(s, 0)) for s in SPLITS}
    counts["labelled"] = int(pc.sum(table.column("labelled").cast(pa.int64())).as_py() or 0)
    return counts


def shard_table_row(part: Path, kv: dict, num_rows: int, counts: dict[str, int] | None = None) -> dict:
    """The shard table row of manifest part `part` from its footer metadata `kv`; a part written
    before shards carried their summary is counted from its rows (`counts`, split_counts of them when
    the caller has them already, or read here)."""
    row = {"shard": part.stem, "samples": num_rows}
    if SUMMARY_META in kv:
        summary = json.loads(kv[SUMMARY_META])
        row.update({k: int(summary.get(k, 0)) for k in (*SPLITS, "labelled")})
    else:
        row.update(counts if counts is not None else split_counts(pq.read_table(part, columns=["split", "labelled"])))
    if TAR_SIZE_META in kv:
        row["bytes"] = int(kv[TAR_SIZE_META])
    else:
        tar = tar_path(part.parents[2], modality_of_manifest_dir(part.parent.name), part.stem)
        row["bytes"] = tar.stat().st_size if tar.exists() else 0
    row["tar_crc32"] = int(kv[TAR_CRC32_META]) if TAR_CRC32_META in kv else -1
    row["units"] = kv[UNITS_META].decode() if UNITS_META in kv else '[""]'
    return row


def shard_summaries(root: str | os.PathLike, modality: str) -> pa.Table:
    """The shard table of `modality` recomputed from the committed manifest parts' footers."""
    parts = sorted(manifest_dir(root, modality).glob("*.parquet"))
    return pa.Table.from_pylist(_footer_reads(_shard_summary, parts), schema=SHARD_TABLE_SCHEMA)


def shard_table_problems(root: str | os.PathLike, footer_rows: dict[str, dict[str, dict]] | None = None) -> list[str]:
    """Where the shard tables differ from the committed manifest parts (verify): a trainer would read
    a stale table's shards, so a missing, extra or changed shard is a problem. No table at all is not.
    `footer_rows` ({modality: {shard: row}}, the rows verify's shard tasks sent back) spares reading
    every manifest footer here."""
    root = Path(root)
    ds = Dataset(root)
    tables = {p.stem for p in (root / TABLE_DIR).glob("*.parquet")} if (root / TABLE_DIR).is_dir() else set()
    if not tables:
        return []
    problems = []
    for modality in sorted(tables | set(ds.modalities)):
        where = f"{TABLE_DIR}/{modality}.parquet"
        if modality not in tables:
            problems.append(f"{where} is missing while other modalities have one (run `python -m shards reindex`)")
            continue
        recorded = {r["shard"]: r for r in pq.read_table(table_path(root, modality)).to_pylist()}
        if footer_rows is not None:
            actual = footer_rows.get(modality, {})
        else:
            actual = {r["shard"]: r for r in shard_summaries(root, modality).to_pylist()}
        for what, names in (("lacks committed shard", sorted(set(actual) - set(recorded))),
                            ("lists uncommitted shard", sorted(set(recorded) - set(actual))),
                            ("disagrees with the manifest footer of",
                             # a table written before a column existed is compared on its own columns
                             sorted(n for n in set(actual) & set(recorded)
                                    if {k: actual[n].get(k) for k in recorded[n]} != recorded[n]))):
            if names:
                problems.append(f"{where} {what}(s) {', '.join(names[:3])}" + (" ..." if len(names) > 3 else "")
                                + " (run `python -m shards reindex`)")
    return problems


def _part_kind(part: Path) -> str:
    meta = pq.read_metadata(part).metadata or {}
    return meta.get(KIND_META, KIND_SLICES.encode()).decode()


def shard_kind(root: str | os.PathLike) -> str | None:
    """The kind of the committed shards from their manifest footers (parts before version 2: slices),
    None without shards; raises when shards of both kinds are committed."""
    parts = sorted((Path(root) / MANIFEST_DIR).glob("modality=*/*.parquet"))
    kinds = set(_footer_reads(_part_kind, parts))
    if len(kinds) > 1:
        raise ValueError(f"{root} holds shards of both kinds {sorted(kinds)}: a dataset holds one kind")
    return kinds.pop() if kinds else None


def _modality_counts(table: pa.Table) -> dict:
    """dataset.json's numbers of one modality from its shard table."""
    total = {c: int(pc.sum(table.column(c)).as_py() or 0) for c in ("samples", *SPLITS, "labelled", "bytes")}
    units = sorted({u for listed in pc.unique(table.column("units")).to_pylist() for u in json.loads(listed)})
    return {**total, "shards": table.num_rows, "units": units}


def _per_sample_counts(ds: Dataset, modality: str) -> dict:
    """The same numbers counted over every manifest row (an independent check of the footers)."""
    table = ds.manifest(modality, columns=["split", "labelled"])
    shard_files = ds.shards(modality)
    return {"samples": table.num_rows, **split_counts(table),
            "shards": len(shard_files), "bytes": sum(s.tar.stat().st_size for s in shard_files if s.tar.exists())}


def _summary(ds: Dataset, tables: dict[str, pa.Table] | None) -> dict:
    if tables is None:
        modalities = {m: _per_sample_counts(ds, m) for m in ds.modalities}
    else:
        modalities = {m: _modality_counts(t) for m, t in tables.items()}
    reasons = error_counts(ds.root)
    return {"samples": sum(c["samples"] for c in modalities.values()),
            "bytes": sum(c["bytes"] for c in modalities.values()), "modalities": modalities,
            "errors": sum(sum(r.values()) for r in reasons.values()), "error_reasons": reasons}


def summarize(root: str | os.PathLike, per_sample: bool = False) -> dict:
    """Counts per modality and split, and rejected inputs by stage and reason, recomputed from disk.

    By default from the per-shard summaries in the manifest and error footers (O(shards) small reads);
    `per_sample=True` counts every manifest row and stats every tar instead (verify's cross-check).
    """
    ds = Dataset(root)
    return _summary(ds, None if per_sample else {m: shard_summaries(root, m) for m in ds.modalities})


def write_dataset_json(root: str | os.PathLike, kind: str | None = None, **extra) -> dict:
    """Write the shard tables (`table/<modality>.parquet`) and then `dataset.json` from the per-shard
    summaries in the manifest footers, plus `extra` fields of the caller (each file atomic).

    `kind` ("slices" or "volumes") defaults to that of the committed shards (none: slices); a kind the
    shards contradict raises, as do shards of both kinds.
    """
    root = Path(root)
    ds = Dataset(root)
    found = shard_kind(root)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
    if kind is not None and found not in (None, kind):
        raise ValueError(f"{root} holds {found} shards: cannot describe it as {kind}")
    kind = kind or found or KIND_SLICES
    tables = {m: shard_summaries(root, m) for m in ds.modalities}
    for modality, table in tables.items():
        write_parquet_atomically(table, table_path(root, modality))
    if (root / TABLE_DIR).is_dir():
        for stale in (root / TABLE_DIR).glob("*.parquet"):
            if stale.stem not in tables:  # a modality whose shards are all gone
                stale.unlink()
    summary = {
        "format": FORMAT_NAME,
        "format_version": format_version(kind),
        "kind": kind,
        "codec": CODEC,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "label_names": ds.label_names(),
        **_summary(ds, tables),
        **extra,
    }
    write_text_atomically(root / DATASET_JSON, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
