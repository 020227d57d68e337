"""python -m ingest SOURCE... --out DATASET: DICOM trees -> modality-partitioned WebDataset shards."""
from __future__ import annotations

import argparse
import os
import sys

from shards.sample import MODALITIES, UNITS

from .config import ConfigError, build_config, parse_size

EPILOG = """\
phases: scan (list folders + read headers, no pixels) -> plan (reject, dedupe, split, shuffle, cut into
shards) -> convert (one Dask task per shard) -> finalize (dataset.json, report).

salt: --salt, else env MEDSWAV_SALT, else `salt` in --config, else the file DATASET.salt next to the
dataset folder (created with a random salt on the first run; keep it private and keep it: reruns need it).
A given salt needs 16+ characters, 8+ of them different. DATASET.salt-check, also next to the dataset,
lets a rerun refuse another salt; nothing inside the dataset can test a guessed salt.

privacy: inside DATASET a source path appears only as its salted hash (errors/ show `sha:<hash>`, error
details are scrubbed of paths); the readable map lives in DATASET.paths/ next to the dataset folder (mode
0700), with the salt file: `python -m ingest.paths DATASET sha:<hash>` prints the file behind an error row.
--keep-paths keeps clear paths inside instead (private use); a dataset keeps the choice it was built with.

resume: rerun the same command after a crash; only uncommitted shards are redone (and a committed shard
whose manifest part was lost is rewritten from the plan, or the run fails naming it).
incremental: rerun with more sources; only slices not yet ingested are added (a new generation).

examples:
  python -m ingest /pacs/export --out /data/medswav --workers 8
  python -m ingest s3://bucket/dicom --out /data/ds --scheduler tcp://head:8786 --shard-size 1GB
  python -m ingest /pacs --out /data/ds --labels findings.csv --config ingest.toml

lock: one job writes a dataset at a time (DATASET/ingest.lock, with owner, host and a heartbeat); a second
job is refused with status 2. A lock whose process on this host is gone, or whose heartbeat is older than
--lock-timeout, is stale and taken over.

exit status: 0 when the job finished (rejected files are listed in DATASET/errors), 1 when some tasks
failed or the dataset's file system failed (disk full: rerun to retry), 2 when the job could not run
(bad arguments, config, scheduler, sources, an --out that is a file or a foreign non-empty folder or not
writable, a dataset locked by another job).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ingest", description=__doc__.split(":", 1)[1].strip(), epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="DICOM files or folders (walked recursively) or fsspec URLs (s3://, gs://, ...)")
    p.add_argument("--out", metavar="DATASET", help="dataset folder to create or extend")
    p.add_argument("--config", metavar="FILE", help="TOML file with any of these settings (command line wins)")
    g = p.add_argument_group("engine")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--workers", type=int, metavar="N", help="embedded LocalCluster with N worker processes (default 2)")
    x.add_argument("--scheduler", metavar="ADDRESS", help="use a running Dask cluster, e.g. tcp://10.0.0.1:8786")
    g.add_argument("--dashboard-address", metavar="ADDR", help="embedded cluster dashboard (default :8787, ':0' = any)")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")
    n = p.add_argument_group("non-DICOM sources (MedMNIST .npz/.npy arrays, PNG/TIFF folders, NIfTI volumes)")
    n.add_argument("--modality", choices=MODALITIES,
                   help="treat the sources as non-DICOM images of this modality; they go through the same "
                        "phases, generations and error ledger (see ingest/arrays.py)")
    n.add_argument("--units", choices=UNITS,
                   help="what their pixel values mean (default raw: no physical unit, normalised per image); "
                        "HU only for CT volumes known to hold Hounsfield units (they then get the HU window)")
    s = p.add_argument_group("shards and pixels")
    s.add_argument("--volumes", action="store_const", const=True,
                   help="one 3-D sample per DICOM series (sorted along the slice normal; series that are not one "
                        "clean volume are split or recorded in errors/, see docs/INGEST.md) instead of one 2-D "
                        "sample per slice; with --modality: one sample per 3-D NIfTI file; a dataset holds one "
                        "kind: volumes and slices do not mix")
    s.add_argument("--shard-size", metavar="SIZE", help="target shard size, e.g. 1GB (default), 256MB, 64MiB")
    s.add_argument("--max-pixel-bytes", metavar="SIZE",
                   help="reject files whose declared decoded pixels, or whose file size, exceed SIZE, before "
                        "decoding (default 2GiB)")
    s.add_argument("--max-side", type=int, metavar="PIXELS",
                   help="reduce images larger than this by an integer block mean (default: keep full size)")
    s.add_argument("--frames-per-unit", type=int, metavar="N",
                   help="multi-frame files are shuffled in runs of N frames (default 16)")
    s.add_argument("--no-direct-io", dest="direct_io", action="store_const", const=False,
                   help="write shards through the page cache instead of O_DIRECT (which is used where the "
                        "filesystem supports it: it spares the workers' CPU and the source files' cache)")
    d = p.add_argument_group("split, order, labels, privacy")
    d.add_argument("--val-fraction", type=float, metavar="F", help="share of patients in the val split (default 0.05)")
    d.add_argument("--seed", type=int, help="shuffle seed (default 0)")
    d.add_argument("--labels", metavar="FILE",
                   help="CSV or Parquet keyed by SOPInstanceUID, SeriesInstanceUID or StudyInstanceUID; "
                        "other columns are numeric labels (with --modality: keyed by a 'path' column, the image "
                        "file's path relative to its source folder, or its name)")
    d.add_argument("--salt", help="secret salt of all hashes, 16+ characters (prefer env MEDSWAV_SALT: argv is visible "
                                  "to other users; default: a random salt generated into DATASET.salt)")
    d.add_argument("--keep-paths", action="store_const", const=True,
                   help="keep clear source paths inside the dataset (inventory/, errors/ and their details), "
                        "for private use; by default they appear there only as salted hashes and the readable "
                        "map is DATASET.paths/ beside the dataset (python -m ingest.paths DATASET HASH)")
    d.add_argument("--hash-paths", action="store_true", help="deprecated: hashing paths is the default (no effect)")
    d.add_argument("--rescan", action="store_const", const=True,
                   help="rescan the sources even when resuming with unchanged sources")
    d.add_argument("--lock-timeout", type=float, metavar="SECONDS",
                   help="a dataset lock (DATASET/ingest.lock) whose heartbeat is older than this is stale and "
                        "taken over (default 600)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .salt import ENV

    if args.hash_paths:
        print("ingest: note: --hash-paths is deprecated and has no effect: hashing paths is the default",
              file=sys.stderr)

    # salt precedence: --salt > MEDSWAV_SALT > config file > DATASET.salt (the env must beat the config file)
    salt = args.salt or os.environ.get(ENV) or None
    try:
        cfg = build_config(
            args.config,
            sources=args.sources or None, out=args.out, workers=args.workers, scheduler=args.scheduler,
            dashboard_address=args.dashboard_address, progress=args.progress,
            shard_size=parse_size(args.shard_size) if args.shard_size else None,
            max_pixel_bytes=parse_size(args.max_pixel_bytes) if args.max_pixel_bytes else None,
            max_side=args.max_side, frames_per_unit=args.frames_per_unit, val_fraction=args.val_fraction,
            seed=args.seed, labels=args.labels, salt=salt, keep_paths=args.keep_paths, rescan=args.rescan,
            modality=args.modality, units=args.units, direct_io=args.direct_io, lock_timeout=args.lock_timeout,
            volumes=args.volumes,
        )
        from .finalize import report
        from .job import JobFailed, run
        from .lock import LockLost

        try:
            summary, stats = run(cfg)  # DICOM and non-DICOM (--modality) sources alike
            stats = vars(stats)
        except (JobFailed, LockLost) as e:
            print(f"ingest: {e}", file=sys.stderr)
            return 1
    except ConfigError as e:
        print(f"ingest: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the dataset's file system failed under the job (disk full, I/O error)
        print(f"ingest: error: {e}; rerun the same command once it is fixed", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ingest: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(report(summary, stats))
    print(f"\ndataset: {cfg.root.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
