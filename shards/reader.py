"""Reading samples without DALI: plain iteration, and a PyTorch IterableDataset via webdataset."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .dataset import Dataset
from .layout import LABELS_EXT, META_EXT, PIXELS_EXT


def _decode(sample: dict) -> tuple[str, np.ndarray, dict, np.ndarray | None]:
    pixels = np.load(io.BytesIO(sample[PIXELS_EXT]), allow_pickle=False)
    meta = json.loads(sample[META_EXT])
    labels = np.load(io.BytesIO(sample[LABELS_EXT]), allow_pickle=False) if LABELS_EXT in sample else None
    return sample["__key__"], pixels, meta, labels


def shard_urls(root: str | os.PathLike, modality: str | None = None) -> list[str]:
    ds = Dataset(root)
    modalities = [modality] if modality else ds.modalities
    return [str(s.tar) for m in modalities for s in ds.shards(m) if s.samples]


def iter_samples(
    root: str | os.PathLike, modality: str | None = None, split: str | None = None, verify: bool = True
) -> Iterator[tuple[str, np.ndarray, dict, np.ndarray | None]]:
    """Yield `(key, pixels, meta, labels)` for every sample, shard by shard, in stored order.

    With `verify` (default), each shard's size and whole-tar CRC-32 are checked against its manifest part
    before it is read: a damaged or missing shard raises `shards.verify.DamagedShardError` naming it
    (webdataset alone would decode flipped pixels silently).
    """
    import webdataset as wds

    from .verify import DamagedShardError, check_tar

    ds = Dataset(root)
    for m in [modality] if modality else ds.modalities:
        for shard in ds.shards(m):
            if not shard.samples:
                continue
            problem = check_tar(ds.root, m, shard.name) if verify else None
            if problem:
                raise DamagedShardError(problem)
            for sample in wds.WebDataset([str(shard.tar)], shardshuffle=False, empty_check=False):
                key, pixels, meta, labels = _decode(sample)
                if split is None or meta.get("split") == split:
                    yield key, pixels, meta, labels


def torch_dataset(root: str | os.PathLike, modality: str | None = None, shuffle_buffer: int = 0, seed: int = 0):
    """A webdataset `WebDataset` (a torch IterableDataset) of decoded samples, split by rank and worker.

    Each item is `(key, pixels, meta, labels)`; wrap it in a `torch.utils.data.DataLoader` as usual.
    """
    import webdataset as wds

    urls = shard_urls(root, modality)
    if not urls:
        raise ValueError(f"no committed shards in {Path(root)}" + (f" for modality {modality!r}" if modality else ""))
    pipeline = wds.WebDataset(
        urls, shardshuffle=bool(shuffle_buffer), seed=seed, nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker, empty_check=False,
    )
    if shuffle_buffer:
        pipeline = pipeline.shuffle(shuffle_buffer)
    return pipeline.map(_decode)
