"""python -m ingest.demo --out DIR: ingest the real DICOM files shipped with pydicom and pydicom-data.

They cover CT, MR, CR (MONOCHROME1), ultrasound in RGB / YBR / palette colour, multi-frame objects,
every common transfer syntax, and deliberately broken files, so the summary shows both the shards and
the rejections. The dataset lands in DIR/dataset (salt in DIR/dataset.salt, the readable map of the
rejected files' hashed paths in DIR/dataset.paths: `python -m ingest.paths DIR/dataset sha:...`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class DemoDataMissing(FileNotFoundError):
    """pydicom's test files are not installed (python -m ingest.demo exits 1 with this one line)."""


def demo_sources() -> list[str]:
    """Folders holding pydicom's test files and pydicom-data's files (each walked recursively)."""
    from pydicom.data import get_testdata_files

    files = [f for f in get_testdata_files() if os.path.isfile(f)]
    if not files:
        raise DemoDataMissing("ingest.demo: pydicom's test files are missing (pip install pydicom pydicom-data)")
    # the deepest common folders: pydicom/data/test_files and data_store/data
    folders = sorted({str(Path(f).parent) for f in files})
    roots: list[str] = []
    for d in folders:
        if not any(d.startswith(r + os.sep) for r in roots):
            roots.append(d)
    return roots


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m ingest.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_output", metavar="DIR", help="output folder (default demo_output)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="local Dask workers (default 2)")
    p.add_argument("--shard-size", default="16MB", metavar="SIZE", help="shard size (default 16MB: several shards)")
    args = p.parse_args(argv)
    from .__main__ import main as ingest_main

    dataset = Path(args.out) / "dataset"
    try:
        sources = demo_sources()
    except DemoDataMissing as e:
        raise SystemExit(str(e)) from None
    code = ingest_main([*sources, "--out", str(dataset), "--workers", str(args.workers),
                        "--shard-size", args.shard_size, "--dashboard-address", ":0",
                        "--val-fraction", "0.2"])  # a few dozen patients only: a larger val share keeps val non-empty
    if code != 0:
        raise SystemExit(code)
    return dataset


if __name__ == "__main__":
    main()
    sys.exit(0)
