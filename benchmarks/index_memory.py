"""Memory of DALI's webdataset index: how much RSS one reader needs per indexed sample.

`python -m benchmarks.index_memory [--quick] [--json PATH]`

Method: synthetic shards of `--per-shard` samples each, written as sparse tar files (no disk blocks)
with index files whose lines look exactly like ours (`json <off> <size> <key>.json npy <off> <size>
<key>.npy`, 24-hex keys). For each N, a fresh child process builds a one-reader DALI pipeline
(ext "npy", CPU, batch 1), runs one step, and reports its resident set size growth over the same
process before building; a 1-shard pipeline gives the fixed cost, subtracted. A least-squares line
through the points gives bytes per sample; the table extrapolates to 100 M samples:

* DALI's own sharding (shard_id/num_shards): every rank's reader parses the WHOLE index, so every
  rank pays for all 100 M samples (x ranks per node).
* medswav's loader (augment_dali.plan): each rank's reader gets only its own 1/W of the samples.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shards.index import Member, write_index
from shards.layout import META_EXT, PIXELS_EXT, member_name

from ._common import parser, print_table, write_json

TARGET = 100_000_000


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def make_shards(folder: Path, samples: int, per_shard: int) -> tuple[list[str], list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    tars, idxs = [], []
    npy_size, json_size = 524_416, 515     # a 512 x 512 int16 slice and its SampleMeta
    pad = lambda n: -(-n // 512) * 512
    stride = 512 + pad(json_size) + 512 + pad(npy_size)  # header, json, header, npy (512-byte blocks)
    for s in range(-(-samples // per_shard)):
        n = min(per_shard, samples - s * per_shard)
        tar, idx = folder / f"ct-g000-{s:06d}.tar", folder / f"ct-g000-{s:06d}.idx"
        with open(tar, "wb") as f:
            f.truncate(n * stride + 1024)  # sparse: offsets are valid, no blocks are written
        samples_members = []
        for i in range(n):
            key = f"{s * per_shard + i:024x}"
            off = i * stride
            samples_members.append([Member(member_name(key, META_EXT), off + 512, json_size),
                                    Member(member_name(key, PIXELS_EXT), off + 1024 + pad(json_size), npy_size)])
        write_index(idx, samples_members)
        tars.append(str(tar))
        idxs.append(str(idx))
    return tars, idxs


def child(folder: str) -> None:
    """Runs in a fresh process: build one reader over every shard in `folder`, print RSS growth."""
    from nvidia.dali import fn, pipeline_def

    tars = sorted(str(p) for p in Path(folder).glob("*.tar"))
    idxs = [t[:-4] + ".idx" for t in tars]
    before = _rss()
    start = time.perf_counter()

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        return fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["npy"], name="reader")

    p = pipe()
    p.build()
    p.run()
    seconds = time.perf_counter() - start
    print(json.dumps({"rss_growth": _rss() - before, "build_s": seconds,
                      "samples": p.reader_meta("reader")["epoch_size"]}))


def measure(samples: int, per_shard: int, tmp: Path) -> dict:
    folder = tmp / f"n{samples}"
    make_shards(folder, samples, per_shard)
    out = subprocess.run([sys.executable, "-m", "benchmarks.index_memory", "--child", str(folder)],
                         capture_output=True, text=True, check=True)
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = parser("RSS of DALI's webdataset index per sample, extrapolated to 100 M samples.")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per synthetic shard (default 1000)")
    p.add_argument("--world-size", type=int, default=32, help="ranks for the per-rank column (default 32 = 4 x 8 GPUs)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: the measuring child process
    args = p.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    sizes = [1000, 100_000, 200_000, 400_000] if args.quick else [1000, 250_000, 500_000, 1_000_000, 2_000_000]
    rows = []
    with tempfile.TemporaryDirectory(prefix="medswav-idxmem-") as tmp:
        for n in sizes:
            r = measure(n, args.per_shard, Path(tmp))
            rows.append({"samples": n, "shards": -(-n // args.per_shard), "rss_growth_MiB": r["rss_growth"] / 2**20,
                         "build_s": r["build_s"]})
            print(f"  {n:>10,} samples: +{r['rss_growth'] / 2**20:8.1f} MiB in {r['build_s']:.1f} s", flush=True)
    n = np.array([r["samples"] for r in rows], float)
    rss = np.array([r["rss_growth_MiB"] for r in rows]) * 2**20
    slope, intercept = np.polyfit(n, rss, 1)
    build_slope = np.polyfit(n, [r["build_s"] for r in rows], 1)[0]
    full = slope * TARGET
    figures = {
        "index_bytes_per_sample": float(slope),
        "index_fixed_MiB": float(intercept / 2**20),
        "index_rss_GiB_at_100M_per_reader_dali_sharding": float(full / 2**30),
        "index_rss_GiB_at_100M_per_rank_medswav_plan": float(full / args.world_size / 2**30),
        "index_parse_s_at_100M_dali_sharding": float(build_slope * TARGET),
        "world_size": args.world_size,
    }
    print_table("DALI webdataset reader: RSS growth vs indexed samples", rows,
                ["samples", "shards", "rss_growth_MiB", "build_s"])
    print_table(f"Extrapolated to {TARGET:,} samples", [
        {"setting": "bytes per sample (slope)", "value": float(slope)},
        {"setting": "one reader over all samples (DALI sharding: EVERY rank), GiB", "value": full / 2**30},
        {"setting": f"per rank with medswav's plan, W={args.world_size}, GiB", "value": full / args.world_size / 2**30},
        {"setting": "index parse time, one reader over all samples, s", "value": float(build_slope * TARGET)},
    ], ["setting", "value"])
    write_json(args.json, "index_memory", figures, {"sizes": sizes, "per_shard": args.per_shard})
    return 0


if __name__ == "__main__":
    sys.exit(main())
