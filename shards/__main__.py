"""python -m shards {info,verify,reindex} DATASET"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

import pyarrow.compute as pc

from .dataset import Dataset, error_counts, write_dataset_json
from .sample import KIND_VOLUMES
from .verify import DEFAULT_WORKERS, IN_PROCESS_MAX_SHARDS, verify


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def _print_volume_summary(ds: Dataset) -> None:
    """Depth and spacing ranges per modality: reads the manifests' depth and spacing columns only."""
    table = ds.manifest(columns=["modality", "depth", "spacing_z", "spacing_y", "spacing_x"])
    for modality in sorted(set(table.column("modality").to_pylist())):
        rows = table.filter(pc.equal(table.column("modality"), modality))
        depth = pc.min_max(rows.column("depth")).as_py()
        line = f"{modality} volumes: depth {depth['min']}-{depth['max']}"
        for axis in ("z", "y", "x"):
            values = rows.column(f"spacing_{axis}")
            finite = values.filter(pc.is_finite(values))
            if len(finite):
                low, high = pc.min_max(finite).as_py().values()
                line += f", spacing {axis} {low:.3g}-{high:.3g} mm"
            else:
                line += f", spacing {axis} unknown"
            if len(finite) < len(values):
                line += f" ({len(values) - len(finite)} unknown)"
        print(line)


def cmd_info(args) -> int:
    ds = Dataset(args.dataset)
    info = ds.info
    kind = ds.kind
    print(f"dataset {ds.root}  (format {info.get('format')} v{info.get('format_version')}, codec {info.get('codec')}, "
          f"kind {kind})")
    header = f"{'modality':<9}{'samples':>10}{'train':>10}{'val':>8}{'labelled':>10}{'shards':>8}{'bytes':>11}"
    print(header)
    print("-" * len(header))
    for name, m in sorted(info.get("modalities", {}).items()):
        print(f"{name:<9}{m['samples']:>10}{m['train']:>10}{m['val']:>8}{m.get('labelled', 0):>10}{m['shards']:>8}{_human(m['bytes']):>11}")
    print("-" * len(header))
    print(f"{'total':<9}{info.get('samples', 0):>10}{'':>28}{sum(m['shards'] for m in info.get('modalities', {}).values()):>8}{_human(info.get('bytes', 0)):>11}")
    if info.get("label_names"):
        print(f"labels: {', '.join(info['label_names'])}")
    if kind == KIND_VOLUMES:
        _print_volume_summary(ds)
    # from dataset.json (a dataset finalized before it carried error_reasons: from the error files' footers)
    reasons = info["error_reasons"] if "error_reasons" in info else error_counts(ds.root)
    counts = Counter({(stage, reason): n for stage, r in reasons.items() for reason, n in r.items()})
    print(f"rejected inputs: {sum(counts.values())}")
    for (stage, reason), n in counts.most_common(args.top):
        print(f"  {n:>7}  {stage:<8} {reason}")
    return 0


def cmd_reindex(args) -> int:
    info = Dataset(args.dataset).info  # keeps the writer's own fields (ingest settings, generations)
    computed = {"format", "format_version", "kind", "codec", "created", "label_names", "samples", "bytes",
                "modalities", "errors", "error_reasons"}
    summary = write_dataset_json(args.dataset, kind=info.get("kind"),
                                 **{k: v for k, v in info.items() if k not in computed})
    print(f"wrote the shard tables of {', '.join(sorted(summary['modalities'])) or 'no modality'} and dataset.json")
    return 0


def cmd_verify(args) -> int:
    report = verify(args.dataset, progress=not args.quiet, workers=args.workers, scheduler=args.scheduler)
    for w in report.warnings:
        print(f"warning: {w}")
    for p in report.problems:
        print(f"PROBLEM: {p}")
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problem(s))"
    print(f"verified {report.shards} shard(s), {report.samples} sample(s): {status}")
    return 0 if report.ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards", description="Inspect and check a medswav dataset (see shards/FORMAT.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print the summary table of a dataset (and, for volumes, depth and spacing ranges)")
    p.add_argument("dataset", help="dataset folder (holds dataset.json)")
    p.add_argument("--top", type=int, default=10, help="most frequent rejection reasons to list (default 10)")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser(
        "verify", help="check every member of every shard against manifest and index; exit 1 on mismatch",
        description="Check every committed shard (whole-tar checksum, tar headers, index, every member's "
                    "checksum, pixel shapes), that no key appears twice, that every JSON and Parquet file "
                    "of the dataset reads, and dataset.json against the manifests. Each finding is a "
                    "PROBLEM line naming the file; uncommitted shards and temporaries are warnings. "
                    "Shards are checked by one Dask task each, every tar read once.",
        epilog="exit status: 0 every check passed (warnings allowed); 1 at least one PROBLEM; "
               "2 the dataset folder does not exist or cannot be read at all, or the Dask scheduler "
               "cannot be reached.")
    p.add_argument("dataset", help="dataset folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar (default: a bar on stderr)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help=f"embedded Dask LocalCluster of N single-threaded worker processes (default "
                        f"{DEFAULT_WORKERS}); 0 checks in this process. Without --workers and --scheduler, "
                        f"a dataset of at most {IN_PROCESS_MAX_SHARDS} shards is checked in this process")
    p.add_argument("--scheduler", metavar="ADDR", default=None,
                   help="address of a running Dask scheduler (tcp://host:8786) instead of a local cluster; "
                        "its workers must see the dataset folder at the same path and import medswav")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("reindex", help="rewrite the shard tables (table/*.parquet) and dataset.json from the shard "
                                       "footers (datasets written before the tables existed); not while ingest runs")
    p.add_argument("dataset", help="dataset folder (holds dataset.json)")
    p.set_defaults(func=cmd_reindex)
    args = parser.parse_args(argv)
    if getattr(args, "workers", None) is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
