"""Where each part of a dataset lives on disk (the one place that knows the folder layout)."""
from __future__ import annotations

from pathlib import Path

DATASET_JSON = "dataset.json"
INVENTORY_DIR = "inventory"
MANIFEST_DIR = "manifest"
ERRORS_DIR = "errors"
SHARDS_DIR = "shards"
STATS_DIR = "stats"
TABLE_DIR = "table"
TMP_MARK = ".tmp-"


def shard_dir(root: Path, modality: str) -> Path:
    return Path(root) / SHARDS_DIR / modality


def tar_path(root: Path, modality: str, name: str) -> Path:
    return Path(root) / SHARDS_DIR / modality / f"{name}.tar"


def idx_path(root: Path, modality: str, name: str) -> Path:
    return Path(root) / SHARDS_DIR / modality / f"{name}.idx"


def manifest_path(root: Path, modality: str, name: str) -> Path:
    return Path(root) / MANIFEST_DIR / f"modality={modality}" / f"{name}.parquet"


def table_path(root: Path, modality: str) -> Path:
    return Path(root) / TABLE_DIR / f"{modality}.parquet"


def errors_path(root: Path, task_name: str) -> Path:
    return Path(root) / ERRORS_DIR / f"{task_name}.parquet"


def temporary(path: Path, token: str) -> Path:
    """A hidden sibling for writing before the atomic rename.

    The leading dot keeps it out of `*.tar` globs and out of pyarrow.dataset discovery, which ignores
    names starting with "." or "_".
    """
    return path.with_name(f".{path.name}{TMP_MARK}{token}")
