"""Where each part of a dataset lives on disk and how its files and tar members are named (the one
place that knows the layout; shards/FORMAT.md describes it)."""
from __future__ import annotations

from pathlib import Path

DATASET_JSON = "dataset.json"
INVENTORY_DIR = "inventory"
MANIFEST_DIR = "manifest"
ERRORS_DIR = "errors"
SHARDS_DIR = "shards"
STATS_DIR = "stats"
ENERGY_STATS_FILE = "energy.json"  # in STATS_DIR, written by `python -m augment_dali.stats`
TABLE_DIR = "table"
PLAN_DIR = "plan"  # the writer's (ingest's) plans: readers ignore it, verify checks that it parses
MODALITY_PARTITION = "modality"  # manifest/modality=<m>/: hive partitioning, the partition column's name
TMP_MARK = ".tmp-"

# Members of one sample in a tar: "<key>.<extension>" (WebDataset and DALI split at the first dot).
META_EXT = "json"
LABELS_EXT = "labels.npy"
PIXELS_EXT = "npy"


def member_name(key: str, extension: str) -> str:
    return f"{key}.{extension}"


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member name: split at the first dot, as WebDataset and DALI do."""
    key, _, extension = name.partition(".")
    return key, extension


def manifest_dir(root: Path, modality: str) -> Path:
    """The folder of a modality's manifest parts (one Parquet file per committed shard)."""
    return Path(root) / MANIFEST_DIR / f"{MODALITY_PARTITION}={modality}"


def modality_of_manifest_dir(name: str) -> str | None:
    """The modality of a manifest sub-folder's name (`modality=<m>`), None for any other name."""
    prefix = f"{MODALITY_PARTITION}="
    return name[len(prefix):] if name.startswith(prefix) else None


def shard_dir(root: Path, modality: str) -> Path:
    return Path(root) / SHARDS_DIR / modality


def tar_path(root: Path, modality: str, name: str) -> Path:
    return Path(root) / SHARDS_DIR / modality / f"{name}.tar"


def idx_path(root: Path, modality: str, name: str) -> Path:
    return Path(root) / SHARDS_DIR / modality / f"{name}.idx"


def manifest_path(root: Path, modality: str, name: str) -> Path:
    return manifest_dir(root, modality) / f"{name}.parquet"


def table_path(root: Path, modality: str) -> Path:
    return Path(root) / TABLE_DIR / f"{modality}.parquet"


def energy_stats_path(root: Path) -> Path:
    return Path(root) / STATS_DIR / ENERGY_STATS_FILE


def errors_path(root: Path, task_name: str) -> Path:
    return Path(root) / ERRORS_DIR / f"{task_name}.parquet"


def temporary(path: Path, token: str) -> Path:
    """A hidden sibling for writing before the atomic rename.

    The leading dot keeps it out of `*.tar` globs and out of pyarrow.dataset discovery, which ignores
    names starting with "." or "_".
    """
    return path.with_name(f".{path.name}{TMP_MARK}{token}")
