"""Uniform, seeded random access to samples of a dataset without DALI (stats, preview, benchmarks).

The manifest gives every member's offset and size in its tar, so one sample costs one seek and one read.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from shards import Dataset


@dataclass(frozen=True)
class SampleRef:
    modality: str
    key: str
    tar: Path
    npy_offset: int
    npy_size: int
    json_offset: int
    json_size: int


def dataset_kind(root: Path, dataset: Dataset | None = None) -> str:
    """"volumes" (one 3-D sample per series) or "slices" (2-D, also datasets written before kinds)."""
    kind = getattr(dataset, "kind", None) if dataset is not None else None
    if kind is None:
        path = Path(root) / "dataset.json"
        kind = json.loads(path.read_text()).get("kind") if path.exists() else None
    return kind or "slices"


def modality_seed(seed: int, modality: str) -> list[int]:
    """An RNG seed sequence specific to (seed, modality), stable across runs and platforms."""
    return [seed, int.from_bytes(hashlib.blake2b(modality.encode(), digest_size=4).digest(), "little")]


def sample_refs(dataset: Dataset, modality: str, n: int, seed: int = 0, split: str | None = None) -> list[SampleRef]:
    """Up to `n` samples drawn uniformly without replacement, sorted by tar and offset for I/O locality."""
    cols = ["key", "shard", "split", "npy_offset", "npy_size", "json_offset", "json_size"]
    table = dataset.manifest(modality, columns=cols)
    if split is not None:
        table = table.filter(pc.equal(table.column("split"), split))
    if table.num_rows == 0:
        return []
    rng = np.random.default_rng(modality_seed(seed, modality))
    chosen = np.sort(rng.choice(table.num_rows, size=min(n, table.num_rows), replace=False))
    rows = table.take(chosen).to_pylist()
    tar_of = {s.name: s.tar for s in dataset.shards(modality)}
    refs = [SampleRef(modality, r["key"], tar_of[r["shard"]], r["npy_offset"], r["npy_size"], r["json_offset"],
                      r["json_size"]) for r in rows]
    return sorted(refs, key=lambda r: (str(r.tar), r.npy_offset))


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise IOError(f"{path}: short read at offset {offset} ({len(data)} of {size} bytes)")
    return data


def read_pixels(ref: SampleRef) -> np.ndarray:
    return np.load(io.BytesIO(_read(ref.tar, ref.npy_offset, ref.npy_size)), allow_pickle=False)


def read_meta(ref: SampleRef) -> dict:
    return json.loads(_read(ref.tar, ref.json_offset, ref.json_size))
