"""Which samples each rank reads in each epoch: the sharding and epoch plan of the loader.

DALI's own sharding (`shard_id`, `num_shards`) makes every rank's reader parse the index of the WHOLE
data set (at 100 M samples that costs every rank the full index in memory, see docs) and cannot filter
the train/val split, which is a per-sample field inside shared tars. So the loader plans the epoch
itself and hands each reader only what that rank reads:

1. Per modality, the shards are put in an order drawn from (seed, epoch, modality): identical on every
   rank, different every epoch.
2. The split's samples of that concatenation are cut into `world_size` contiguous ranges
   [N*r//W, N*(r+1)//W): disjoint, covering everything, sizes differing by at most one. Each rank
   reads its range starting at a random point (drawn from seed, epoch, modality, rank) and wrapping
   around, so the part of a large modality read in a short epoch is placed at random even when the
   modality has few, large shards.
   The shards' sizes and split counts come from the modality's shard table (one small file written
   when the dataset was finalized), so start-up opens one file per modality, not one per shard.
3. A shard lying wholly inside the range whose samples all belong to the split is read through its own
   `.idx`; otherwise a small derived `.idx` listing only the wanted lines (same tar, same offsets) is
   written to the loader's cache folder.
4. Steps per epoch = min over modalities of (N_m // W) // (B / M): the same number on every rank, and
   no rank reads past its range, so no sample repeats within an epoch on a rank.

The epoch is thus one pass over the smallest modality (per rank); larger modalities contribute a
different, randomly placed part of their data each epoch (their shard order changes per epoch).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from shards import SPLITS, Dataset
from shards.atomic import write_text_atomically
from shards.index import format_index_lines, read_index_lines
from shards.layout import manifest_path, shard_dir


@dataclass(frozen=True)
class ShardEntry:
    name: str
    folder: Path    # shards/<modality>/ (one object shared by all entries: paths are made for a rank's share only)
    total: int      # samples in the shard (all splits)
    selected: int   # samples of the requested split

    @property
    def tar(self) -> Path:
        return self.folder / f"{self.name}.tar"

    @property
    def idx(self) -> Path:
        return self.folder / f"{self.name}.idx"


@dataclass(frozen=True)
class ReaderFiles:
    """Input of one `fn.readers.webdataset`: tars with matching index files, and how many samples."""

    tars: list[str]
    indices: list[str]
    samples: int


def modality_shards(dataset: Dataset, modality: str, split: str | None) -> list[ShardEntry]:
    """Committed shards of one modality with their sample counts for `split` (None: all splits).

    From the modality's shard table (one small file, shards/FORMAT.md): start-up reads no manifest part
    and no index; a rank opens only the files of its own share, when it builds its readers.
    """
    table = dataset.shard_table(modality)
    if split is not None and split not in table.schema.names:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    names = table.column("shard").to_pylist()
    totals = table.column("samples").to_pylist()
    selected = totals if split is None else table.column(split).to_pylist()
    folder = shard_dir(dataset.root, modality)
    return [ShardEntry(name, folder, total, n) for name, total, n in zip(names, totals, selected) if total > 0]


def shard_order(n_shards: int, seed: int, epoch: int, modality: str) -> np.ndarray:
    """The epoch's shard permutation of one modality: a function of (seed, epoch, modality) only."""
    tag = int.from_bytes(hashlib.blake2b(modality.encode(), digest_size=4).digest(), "little")
    return np.random.default_rng([seed, epoch, tag]).permutation(n_shards)


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    return total * rank // world_size, total * (rank + 1) // world_size


def steps_per_epoch(selected: dict[str, int], world_size: int, per_modality_batch: int) -> int:
    """Steps every rank takes per epoch: the smallest modality's per-rank share, in whole batches."""
    return min((n // world_size) // per_modality_batch for n in selected.values())


def _split_positions(dataset: Dataset, modality: str, shard: str, split: str) -> np.ndarray:
    import pyarrow.parquet as pq

    part = manifest_path(dataset.root, modality, shard)
    table = pq.read_table(part, columns=["index", "split"])
    mask = pc.equal(table.column("split"), split)
    return np.sort(table.column("index").filter(mask).to_numpy())


def _rotate(segments: list, by: int) -> list:
    """The same samples in reading order starting `by` samples in, wrapping around to the start."""
    done = 0
    for k, (shard, lo, hi) in enumerate(segments):
        if done + (hi - lo) > by:
            cut = lo + by - done
            head = [(shard, cut, hi)] + segments[k + 1:]
            tail = segments[:k] + ([(shard, lo, cut)] if cut > lo else [])
            return head + tail
        done += hi - lo
    return segments


class EpochPlanner:
    """Builds each rank's reader input for an epoch; derived index files go to `cache_dir`."""

    def __init__(self, dataset: Dataset, modality: str, split: str | None, cache_dir: Path | None):
        self.dataset = dataset
        self.modality = modality
        self.split = split
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.shards = modality_shards(dataset, modality, split)
        self.selected = sum(s.selected for s in self.shards)
        self._partials: set[Path] = set()

    def files(self, seed: int, epoch: int, rank: int, world_size: int) -> ReaderFiles:
        start, stop = rank_range(self.selected, rank, world_size)
        segments, offset = [], 0  # (shard, lo, hi): lines [lo, hi) of the shard's split-filtered samples
        for i in shard_order(len(self.shards), seed, epoch, self.modality):
            shard = self.shards[i]
            lo, hi = max(start - offset, 0), min(stop - offset, shard.selected)
            offset += shard.selected
            if lo < hi:
                segments.append((shard, lo, hi))
        if stop > start:
            tag = int.from_bytes(hashlib.blake2b(self.modality.encode(), digest_size=4).digest(), "little")
            segments = _rotate(segments, int(np.random.default_rng([seed, epoch, tag, rank]).integers(stop - start)))
        tars, indices, partials = [], [], set()
        for shard, lo, hi in segments:
            tars.append(str(shard.tar))
            if lo == 0 and hi == shard.selected == shard.total:
                indices.append(str(shard.idx))
                continue
            path = self._derived_index(shard, lo, hi)
            indices.append(str(path))
            if not (lo == 0 and hi == shard.selected):
                partials.add(path)
        for old in self._partials - partials:  # edge pieces of earlier epochs (readers parse at build)
            old.unlink(missing_ok=True)
        self._partials = partials
        return ReaderFiles(tars, indices, stop - start)

    def _derived_index(self, shard: ShardEntry, lo: int, hi: int) -> Path:
        """An index of lines [lo, hi) of the shard's split-filtered samples (same tar, same offsets)."""
        path = self.cache_dir / self.modality / f"{shard.name}.{self.split or 'all'}.{lo}-{hi}.idx"
        if path.exists():
            return path
        lines = read_index_lines(shard.idx)
        if len(lines) != shard.total:
            raise ValueError(f"{shard.idx}: {len(lines)} samples, manifest says {shard.total}")
        if self.split is not None and shard.selected != shard.total:
            lines = [lines[j] for j in _split_positions(self.dataset, self.modality, shard.name, self.split)]
        # a cache rebuilt when lost: atomic for concurrent readers, no fsync
        write_text_atomically(path, format_index_lines(lines[lo:hi]), encoding="ascii", durable=False)
        return path
