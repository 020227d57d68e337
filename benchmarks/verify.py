"""`shards verify` throughput: shards per second with 1 and 2 Dask workers, and CPU seconds per shard.

    python -m benchmarks.verify [--shards N] [--slices N] [--repeat N] [--quick] [--json PATH]

Data set: N shards of real CT slices (KiTS, 512 x 512 int16, ~0.5 MB each, from ../shared/data) written
by shards.ShardWriter under fresh keys, so every shard is a real one of `--slices` samples (default 384
slices, ~200 MB, a fifth of ingest's 1 GB shards, so the fixed cost of a Dask task and of the client's
per-shard work weighs about as it does in a real dataset). Each round
times `shards.verify.verify` (every check, duplicate keys and dataset.json included) in this process
(`--workers 0`) and through an embedded LocalCluster of 1 and of 2 single-threaded workers, the cluster
started before the clock and warmed by one untimed run (its start is reported apart: a fixed cost per
command, not per shard). The figures are medians over the rounds. The tars are read from the page cache
(they were just written): this measures the CPU side of verify (tar parsing, checksums, npy headers),
which is what the worker count scales; on cold storage the disk's read rate caps it as well.

CPU seconds per shard (summed over the workers' processes, from their own clocks) does not depend on how
busy the machine is, unlike shards/s on a shared machine: workers / cpu_s_per_shard is the rate the same
workers reach on idle cores.

Projection (figures of 2026-11-30 in benchmarks/RESULTS.md: 0.046 worker CPU s per 64-slice, 34 MB
shard, i.e. ~0.7 GB/s per worker core from the page cache). A 1 GB shard holds ~2000 512 x 512 int16
slices and costs ~1.4 CPU s. 100 M slices = ~50 k shards, 50 TB: ~20 core-hours, 12 min on 100 workers
if the storage delivers 70 GB/s, else storage-bound (1.4 h at 10 GB/s). 1 B slices = ~500 k shards,
500 TB: ~200 core-hours, 2 h on 100 workers CPU-wise, 14 h at 10 GB/s: on real clusters the read rate,
which reading each tar once halves, sets the time. The client's share: 8 bytes per key into the bucket
files as the tasks return (8 GB for 1 B keys), then one in-memory sort per 1/256 bucket (~30 MB each).
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ._common import parser, print_table, write_json

SHARED = Path(os.environ.get("MEDSWAV_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SALT = "benchmark-verify"


def _ct_slices():
    import glob

    import pydicom

    dicom = SHARED / "dicom"
    if not dicom.is_dir():
        dicom = Path("/work/shared/data/dicom")
    files = sorted(glob.glob(str(dicom / "ct_kits_abdomen_18" / "*.dcm")))
    if not files:
        raise SystemExit(f"benchmarks.verify: real DICOM not found under {dicom} (set MEDSWAV_SHARED_DATA)")
    return [pydicom.dcmread(f).pixel_array for f in files]


def build(root: Path, shards: int, slices: int) -> int:
    """N committed CT shards of `slices` real slices each, every key distinct; returns the bytes written."""
    import shards as fmt

    pixels = _ct_slices()
    for s in range(shards):
        with fmt.ShardWriter(root, "ct", f"ct-g000-{s:06d}") as w:
            for i in range(slices):
                meta = fmt.SampleMeta(modality="ct", split="val" if i % 10 == 0 else "train")
                w.write(fmt.sample_key(f"shard{s}/slice{i}", 0, SALT), pixels[i % len(pixels)], meta)
    fmt.write_dataset_json(root)
    return sum(p.stat().st_size for p in root.rglob("*.tar"))


def _cpu_seconds() -> float:
    return time.process_time()


def run_with(root: Path, workers: int, repeat: int) -> dict:
    from shards.verify import dask_client, verify

    if workers == 0:
        verify(root, workers=0)  # warm: imports, page cache
        walls, cpus = [], []
        for _ in range(repeat):
            c0, t0 = time.process_time(), time.perf_counter()
            report = verify(root, workers=0)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            assert report.ok, report.problems
        return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "start": 0.0}
    t0 = time.perf_counter()
    with dask_client(workers, None) as client:
        start = time.perf_counter() - t0
        verify(root, client=client)  # warm: each worker imports shards and pyarrow
        walls, cpus = [], []
        for _ in range(repeat):
            before = sum(client.run(_cpu_seconds).values())
            t0 = time.perf_counter()
            report = verify(root, client=client)
            walls.append(time.perf_counter() - t0)
            cpus.append(sum(client.run(_cpu_seconds).values()) - before)
            assert report.ok, report.problems
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "start": start}


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=None, help="shards in the data set (default 24; --quick 8)")
    p.add_argument("--slices", type=int, default=None,
                   help="CT slices per shard (default 384, ~200 MB: ingest's shards are 1 GB, and per-task costs "
                        "would weigh 30x more in 34 MB shards; --quick 32)")
    p.add_argument("--repeat", type=int, default=None, help="timed rounds per configuration (default 3; --quick 1)")
    p.add_argument("--keep", metavar="DIR", help="build the data set here and keep it (default: a temporary folder)")
    args = p.parse_args(argv)
    shards = args.shards or (8 if args.quick else 24)
    slices = args.slices or (32 if args.quick else 384)
    repeat = args.repeat or (1 if args.quick else 3)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="medswav-bench-verify-"))
    try:
        nbytes = build(root, shards, slices)
        rows, results = [], {}
        for workers in (0, 1, 2):
            r = run_with(root, workers, repeat)
            results[workers] = r
            rows.append({
                "workers": "in-process" if workers == 0 else str(workers),
                "shards/s": shards / r["wall"],
                "MB/s": nbytes / r["wall"] / 1e6,
                "worker CPU s/shard": r["cpu"] / shards,
                "cluster start s": r["start"],
            })
        print_table(f"verify: {shards} shards x {slices} CT slices ({nbytes / 1e6:.0f} MB), median of {repeat}",
                    rows, ["workers", "shards/s", "MB/s", "worker CPU s/shard", "cluster start s"])
        figures = {
            "shards_per_s_in_process": shards / results[0]["wall"],
            "shards_per_s_1w": shards / results[1]["wall"],
            "shards_per_s_2w": shards / results[2]["wall"],
            "scaling_1_to_2": results[1]["wall"] / results[2]["wall"],
            "cpu_s_per_shard_1w": results[1]["cpu"] / shards,
            "cpu_s_per_shard_2w": results[2]["cpu"] / shards,
            "load_average_1min": os.getloadavg()[0],
        }
        print(f"scaling 1 -> 2 workers: {figures['scaling_1_to_2']:.2f} (target >= 1.7); "
              f"load average now {figures['load_average_1min']:.1f} on {os.cpu_count()} cores")
        write_json(args.json, "verify", figures,
                   {"shards": shards, "slices_per_shard": slices, "bytes": nbytes, "repeat": repeat})
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
