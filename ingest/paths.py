"""The readable path map beside a dataset: which source file is behind a `sha:...` in errors/.

Private by default: inside the dataset folder a source path appears only as its salted hash (the
`source_hash` of the inventory and manifests, `sha:<hash>` in errors/). Folders are often named after
patients (`SMITH^JOHN_123456/`), so the clear paths live in `<DATASET>.paths/`, next to the dataset
folder like the salt file `<DATASET>.salt`: copying or publishing the dataset folder leaves them behind.

    DATASET.paths/                     mode 0700, files 0600
      gNNN/map/part-*.parquet          source_hash -> path text of every source the scan of generation NNN
                                       saw (files read, files and folders rejected: rejected-*.parquet
                                       for a DICOM scan); written by the scan tasks themselves, kept for good
      arrays/*.parquet                 rejected non-DICOM inputs of datasets written before those sources
                                       joined the generations (still read; new ones are in gNNN/map)
      work/gNNN/shards/<shard>.parquet each pending shard's slice list (with paths) that convert opens;
                                       removed when the generation completes
      work/gNNN/scan-errors/*.arrows   each scan task's rejections until merged into errors/ (ingest.plan)

With `--keep-paths` (config `keep_paths = true`) the dataset keeps clear paths inside instead
(inventory `source`, errors `source` and details), for private use; only the pending work files are
then beside it.

    python -m ingest.paths DATASET sha:0123abcd...    # prints the path behind each hash (exit 1: unknown)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pyarrow as pa

SUFFIX = ".paths"
PATHS_SCHEMA = pa.schema([("source_hash", pa.string()), ("path", pa.string())])


def map_dir(root: str | os.PathLike) -> Path:
    """`<DATASET>.paths`, next to the dataset folder (ingest.salt.beside)."""
    from .salt import beside

    return beside(Path(root), SUFFIX)


def make_map_dir(root: str | os.PathLike) -> Path:
    """Create the map folder private to its owner (0700), whatever the umask; fix a laxer existing one."""
    path = map_dir(root)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def generation_map_part(root: str | os.PathLike, generation: int, task_index: int, batch: int = 0) -> Path:
    return map_dir(root) / f"g{generation:03d}" / "map" / f"part-{task_index:05d}-{batch:03d}.parquet"


def generation_map_dir(root: str | os.PathLike, generation: int) -> Path:
    return map_dir(root) / f"g{generation:03d}"


def work_dir(root: str | os.PathLike, generation: int | None = None) -> Path:
    """Where pending work files that name source paths live (beside the dataset, never inside)."""
    base = map_dir(root) / "work"
    return base if generation is None else base / f"g{generation:03d}"


def write_map(path: Path, rows: list[dict]) -> None:
    """One map part (rows of source_hash, path), mode 0600, written atomically."""
    from shards.atomic import write_parquet_atomically

    write_parquet_atomically(pa.Table.from_pylist(rows, schema=PATHS_SCHEMA), path)
    path.chmod(0o600)  # the 0700 map folder already keeps others out; the part itself says so too


def read_map(root: str | os.PathLike, generation: int | None = None, source_hashes: pa.Array | None = None) -> pa.Table:
    """The map parts of one generation, or all of them (arrays included); duplicate rows possible.
    With `source_hashes`, only their rows, streamed part by part (memory follows the matches)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    base = map_dir(root)
    pattern = f"g{generation:03d}/map/*.parquet" if generation is not None else "g*/map/*.parquet"
    parts = sorted(base.glob(pattern))
    if generation is None:
        parts += sorted(base.glob("arrays/*.parquet"))
    if not parts:
        return PATHS_SCHEMA.empty_table()
    wanted = None if source_hashes is None else pc.field("source_hash").isin(source_hashes)
    return pads.dataset([str(p) for p in parts], schema=PATHS_SCHEMA, format="parquet").to_table(filter=wanted)


def remove_empty(root: str | os.PathLike) -> None:
    """Remove work folders left empty (and the map folder itself when nothing is left in it)."""
    base = map_dir(root)
    for folder in (work_dir(root), base):
        try:
            for sub in sorted(folder.glob("*"), reverse=True):
                if sub.is_dir():
                    try:
                        sub.rmdir()
                    except OSError:
                        pass
            folder.rmdir()
        except OSError:
            pass  # not empty (or not there)


def resolve(root: str | os.PathLike, hashes: list[str]) -> dict[str, str]:
    """{hash: path} for the given hashes (`sha:` prefix optional) found in the map beside `root`."""
    import pyarrow.compute as pc

    from .scan import text_path

    import pyarrow.dataset as pads

    wanted = pa.array(sorted({h.removeprefix("sha:") for h in hashes}), pa.string())
    base = map_dir(root)
    parts = [str(p) for p in sorted(base.glob("g*/map/*.parquet")) + sorted(base.glob("arrays/*.parquet"))]
    if not parts:
        return {}
    # streamed part by part, keeping only the matches: the map of a billion files never sits in memory
    found = pads.dataset(parts, schema=PATHS_SCHEMA, format="parquet").to_table(
        filter=pc.field("source_hash").isin(wanted))
    return {h: text_path(p) for h, p in zip(found.column("source_hash").to_pylist(), found.column("path").to_pylist())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ingest.paths",
        description="Print the source path behind each salted hash of a dataset (errors/ 'sha:...' sources, "
                    "inventory and manifest source_hash), read from the map DATASET.paths/ beside the dataset.",
        epilog="exit status: 0 when every hash was found, 1 when some were not (printed as '<hash> TAB ?'), "
               "2 when the map is missing.")
    p.add_argument("dataset", metavar="DATASET", help="the dataset folder (its map is DATASET.paths/)")
    p.add_argument("hashes", nargs="+", metavar="HASH", help="sha:<hex> as in errors/, or the bare hex")
    args = p.parse_args(argv)
    if not map_dir(args.dataset).is_dir():
        print(f"ingest.paths: error: no path map at {map_dir(args.dataset)} (a dataset built with --keep-paths "
              f"keeps clear paths inside instead)", file=sys.stderr)
        return 2
    found = resolve(args.dataset, args.hashes)
    missing = 0
    for h in args.hashes:
        path = found.get(h.removeprefix("sha:"))
        missing += path is None
        # bytes: a file name need not be UTF-8 (os.fsencode restores its original bytes)
        sys.stdout.buffer.write(h.encode() + b"\t" + (b"?" if path is None else os.fsencode(path)) + b"\n")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
