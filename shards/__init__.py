"""The on-disk contract of a medswav dataset (see FORMAT.md): writing, reading and verifying shards.

The names below are loaded on first use: `import shards.layout` (or `shards.sample`) stays cheap for
callers that need only names and constants, such as ingest's command line before any work starts.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "CODEC": "dataset", "FORMAT_VERSION": "dataset", "Dataset": "dataset", "ShardFiles": "dataset",
    "summarize": "dataset", "write_dataset_json": "dataset", "write_errors": "dataset",
    "salted_hash": "keys", "sample_key": "keys",
    "KIND_SLICES": "sample", "KIND_VOLUMES": "sample", "KINDS": "sample", "MODALITIES": "sample", "SPLITS": "sample", "UNITS": "sample", "UNITS_HU": "sample", "UNITS_RAW": "sample",
    "SampleMeta": "sample",
    "ShardWriter": "writer",
}

__all__ = [
    "CODEC", "FORMAT_VERSION", "KIND_SLICES", "KIND_VOLUMES", "KINDS", "MODALITIES", "SPLITS", "UNITS", "UNITS_HU", "UNITS_RAW", "Dataset", "SampleMeta", "ShardFiles", "ShardWriter",
    "salted_hash", "sample_key", "summarize", "write_dataset_json", "write_errors",
]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    elif name == "reader":
        value = importlib.import_module(".reader", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__, "reader"])
