"""Parquet schemas of the manifest (one row per sample) and the error log (one row per rejected input)."""
from __future__ import annotations

import pyarrow as pa

from .atomic import write_parquet_atomically  # noqa: F401  (where writers have imported it from)
from .sample import SPLITS

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("index", pa.int32()),
        ("split", pa.string()),
        ("rows", pa.int32()),
        ("cols", pa.int32()),
        ("dtype", pa.string()),
        ("frame", pa.int32()),
        ("sop_hash", pa.string()),
        ("series_hash", pa.string()),
        ("study_hash", pa.string()),
        ("patient_hash", pa.string()),
        ("source_hash", pa.string()),
        ("json_offset", pa.int64()),
        ("json_size", pa.int64()),
        ("json_crc32", pa.int64()),
        ("npy_offset", pa.int64()),
        ("npy_size", pa.int64()),
        ("npy_crc32", pa.int64()),
        ("labels_offset", pa.int64()),
        ("labels_size", pa.int64()),
        ("labelled", pa.bool_()),
        ("labels", pa.string()),
        # format version 2: 0 for a 2-D sample, the slice count of a volume; spacing in mm, NaN when unknown
        ("depth", pa.int32()),
        ("spacing_z", pa.float64()),
        ("spacing_y", pa.float64()),
        ("spacing_x", pa.float64()),
    ]
)
# Columns added by format version 2 and the value a manifest part written before them reads as.
V2_COLUMN_DEFAULTS = {"depth": 0, "spacing_z": float("nan"), "spacing_y": float("nan"), "spacing_x": float("nan")}

ERRORS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

# Shard-level facts kept in each manifest part's Parquet schema metadata.
LABEL_NAMES_META = b"medswav.label_names"
TAR_CRC32_META = b"medswav.tar_crc32"
TAR_SIZE_META = b"medswav.tar_size"
# The shard's summary (JSON {"samples", "train", "val", "test", "labelled"}): finalize and `shards info`
# read it from the Parquet footer instead of reading every row.
SUMMARY_META = b"medswav.summary"
# In each error file: JSON {stage: {reason: count}} of its rows, read from the footer by finalize.
ERROR_COUNTS_META = b"medswav.error_counts"

# The per-modality shard table (`table/<modality>.parquet`, written by `write_dataset_json`): one row per
# committed shard, so a training rank learns every shard's size and split counts from one small file.
SHARD_TABLE_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("samples", pa.int64()),
        *((split, pa.int64()) for split in SPLITS),
        ("labelled", pa.int64()),
        ("bytes", pa.int64()),
        ("tar_crc32", pa.int64()),
        ("units", pa.string()),  # the part's medswav.units (JSON list; '[""]' for parts written before units)
    ]
)
KIND_META = b"medswav.kind"  # "slices" or "volumes" (shards.sample.KINDS); absent in version 1 parts: slices
UNITS_META = b"medswav.units"  # JSON list: the distinct SampleMeta.units of the shard's samples, sorted

