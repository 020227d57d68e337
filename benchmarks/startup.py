"""Training rank start-up with many shards: seconds from loader construction to the first batch.

`python -m benchmarks.startup [--shards N] [--quick] [--json PATH] [--dir DATASET] [--world-size W]`

A dataset of N small shards (default 10,000; --quick: 1,000) is synthesised with `shards.ShardWriter`
(real tars, DALI indices and manifest parts, a few 32 x 32 uint16 MR-like samples per shard), finalized
with `shards.write_dataset_json` (which writes the shard table) and given reference band energies. Then
rank 0 of W (default 32) builds a `SwavLoader` (CPU DALI pipeline, AugmentConfig.small()) and takes
its first batch; the time is split into construction (planning from the shard table) and the first
batch (the rank's share of tars and indices opened, pipeline built, buffer filled). torch is imported
before the clock starts, as a trainer has imported it before it builds its loader.
The same is measured once more with the shard table moved aside: the fallback for datasets written
before the table existed, which reads one manifest footer per shard.
Figure: `startup_seconds` (first row) <= 2 s with 10,000 shards.
With --dir, an existing synthetic dataset there is reused (and a missing one written there).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ._common import parser, print_table, write_json

MODALITY = "mr"
SIDE = 32
TARGET_SECONDS = 2.0
WRITER_THREADS = 8


def build_dataset(root: Path, n_shards: int, per_shard: int, seed: int = 0) -> Path:
    import shards
    from augment_dali.config import AugmentConfig
    from augment_dali.stats import compute_stats, write_stats

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 1000, size=(SIDE, SIDE)).astype(np.uint16)  # one texture, shifted per sample

    def write_shard(s: int) -> None:
        with shards.ShardWriter(root, MODALITY, f"{MODALITY}-g000-{s:06d}", direct_io=False) as w:
            for i in range(per_shard):
                uid = f"bench.{s}.{i}"
                pixels = np.roll(base, (s + i) % SIDE, axis=0) + np.uint16(s % 7)
                meta = shards.SampleMeta(modality=MODALITY, split="val" if (s + i) % 10 == 9 else "train",
                                         sop_hash=shards.salted_hash(uid, "bench"))
                w.write(shards.sample_key(uid, 0, "bench"), pixels, meta)

    # threads: a tiny shard's cost is its two fsyncs, which release the GIL
    with ThreadPoolExecutor(WRITER_THREADS) as pool:
        list(pool.map(write_shard, range(n_shards)))
    shards.write_dataset_json(root)
    write_stats(root, compute_stats(root, samples=64, seed=0, config=AugmentConfig.small(), show_progress=False))
    return root


def first_batch(root: Path, world_size: int, rank: int, batch_size: int) -> dict:
    from augment_dali.config import AugmentConfig
    from augment_dali.loader import SwavLoader
    from augment_dali.plan import rank_range
    import torch  # noqa: F401  a trainer imports torch (seconds) before it builds its loader: not timed

    start = time.perf_counter()
    loader = SwavLoader(root, batch_size=batch_size, rank=rank, world_size=world_size, device="cpu",
                        augment=AugmentConfig.small(), steps_per_epoch=1)
    built = time.perf_counter()
    step = next(iter(loader))
    done = time.perf_counter()
    assert tuple(step["crops"][0].shape[:2]) == (batch_size, 2)
    lo, hi = rank_range(loader.samples_per_modality[MODALITY], rank, world_size)
    return {"construct_s": built - start, "first_batch_s": done - built, "startup_seconds": done - start,
            "rank_samples": hi - lo}


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, help="number of shards (default 10,000; --quick 1,000)")
    p.add_argument("--samples-per-shard", type=int, default=2, help="samples in each shard (default 2)")
    p.add_argument("--world-size", type=int, default=32, help="ranks of the simulated job (default 32); rank 0 starts")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of the rank (default 8)")
    p.add_argument("--dir", help="where the synthetic dataset is (reused) or written (default: a temporary folder)")
    args = p.parse_args(argv)
    n_shards = args.shards or (1000 if args.quick else 10_000)
    temporary = None if args.dir else Path(tempfile.mkdtemp(prefix="medswav-startup-"))
    root = Path(args.dir) if args.dir else temporary / "dataset"
    try:
        from shards import Dataset
        from shards.layout import DATASET_JSON, TABLE_DIR

        if (root / DATASET_JSON).exists():
            info = Dataset(root).info["modalities"].get(MODALITY, {})
            if info.get("shards") != n_shards:
                raise SystemExit(f"{root} holds {info.get('shards')} shards, not {n_shards}: use another --dir")
            print(f"reusing {root}")
        else:
            start = time.perf_counter()
            build_dataset(root, n_shards, args.samples_per_shard)
            print(f"wrote {n_shards:,} shards to {root} in {time.perf_counter() - start:.1f} s")
        rows = [{"reading": "shard table", **first_batch(root, args.world_size, 0, args.batch_size)}]
        aside = root.parent / f".{root.name}-table-aside"
        (root / TABLE_DIR).rename(aside)
        try:
            rows.append({"reading": "no table (footers)", **first_batch(root, args.world_size, 0, args.batch_size)})
        finally:
            aside.rename(root / TABLE_DIR)
        print_table(f"rank 0 of {args.world_size}, {n_shards:,} shards x {args.samples_per_shard} samples, CPU DALI",
                    rows, ["reading", "construct_s", "first_batch_s", "startup_seconds", "rank_samples"])
        figure = rows[0]["startup_seconds"]
        verdict = "met" if figure <= TARGET_SECONDS else "NOT met"
        print(f"\nstartup_seconds = {figure:.2f} s with {n_shards:,} shards (target <= {TARGET_SECONDS:.0f} s: {verdict})")
        write_json(args.json, "startup", {"startup_seconds": figure, "rows": rows},
                   {"shards": n_shards, "samples_per_shard": args.samples_per_shard, "world_size": args.world_size,
                    "batch_size": args.batch_size})
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
