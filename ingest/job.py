"""The ingestion job: scan -> plan -> convert -> finalize, resumable and incremental.

Generations. Every run that finds slices not yet planned creates a new generation g (plan/gNNN.json,
plan/gNNN.parquet, shards named <m>-gNNN-<i>). A generation's plan is written before any shard, so a
rerun after a crash finishes exactly that plan (same keys, same shard assignment): committed shards
(manifest part present) are skipped, the others are rewritten under the same names. When the rerun's
sources equal the pending generation's sources, it does not rescan (use --rescan to force). After that,
or on any later run, the sources are scanned and only slices (SOP instance + frame) that no earlier
generation planned go into a new generation.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import plan as planning
from shards.layout import DATASET_JSON, ERRORS_DIR

from .config import ConfigError, IngestConfig
from .convert import run_convert_task, shard_done
from .engine import dask_client, run_phase
from .finalize import finalize, report
from .lock import LOCK_FILE, DatasetLock
from .paths import generation_map_dir, make_map_dir, read_map, remove_empty, work_dir
from .salt import ENV, STATE_FILE, read_state, resolve_salt, salt_file, write_state
from .scan import INVENTORY_DIR, INVENTORY_EXTENSION, INVENTORY_SCHEMA, WORK_DIR, path_text, run_scan_task, scan_tasks

INGEST_VERSION = 1
SCAN_TASKS_PER_WORKER = 16  # small enough that the last task to finish leaves little idle time


class JobFailed(RuntimeError):
    """The job ran but some tasks failed; rerunning the same command retries them."""


@dataclass
class RunStats:
    files: int = 0
    new_slices: int = 0
    already_ingested: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    generations: list[int] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # scan, plan, convert, finalize
    job_seconds: float = 0.0  # from the connected cluster to the written dataset.json (before shutdown)

    def add_time(self, phase: str, seconds: float) -> None:
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _read_inventory(root: Path, g: int, hash_paths: bool, source_hashes: pa.Array) -> pa.Table:
    """This run's (generation g's) inventory rows of the given source files, with where to read them
    ("path"): for rewriting lost shards, which need the rows of their own files only. The parts are
    streamed and filtered, so the client holds what the lost shards need, never the whole inventory."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    parts = [str(p) for p in sorted((root / INVENTORY_DIR).glob(f"part-g{g:03d}-*.parquet"))]
    # DICOM parts lack the non-DICOM extension columns: the dataset schema reads them as nulls
    schema = pa.schema([*INVENTORY_SCHEMA, *INVENTORY_EXTENSION])
    table = (pads.dataset(parts, schema=schema, format="parquet").to_table(
        filter=pc.field("source_hash").isin(source_hashes)) if parts else schema.empty_table())
    table = planning.first_per_source(table)  # overlapping sources (/a and /a/b) list some files twice
    if not hash_paths:
        return table.append_column("path", table.column("source"))
    paths = read_map(root, g, source_hashes)  # written by the same scan tasks, beside the dataset (ingest.paths)
    if not paths.num_rows:
        return table.append_column("path", pa.array([""] * table.num_rows, pa.string()))
    return planning.with_paths(table, planning.first_per_source(paths))  # adds "path"


def _convert_shards(client, root: Path, g: int, todo: list[tuple[str, str]], meta: dict, cfg: IngestConfig,
                    salt: str, label_names: list[str], stats: RunStats) -> dict[str, int]:
    """Run the convert tasks of `todo` ((name, modality), in start order); returns {name: samples} of the
    shards written now (a task that found its shard committed already is left out). Raises JobFailed
    when a task failed."""
    token = uuid.uuid4().hex[:8]
    start = time.perf_counter()
    results, failures = run_phase(
        client, f"convert g{g:03d}", _convert_item, todo, key_of=lambda it: f"convert-{it[0]}-{token}",
        progress=cfg.progress, root=str(root), generation=g, label_names=label_names, salt=salt,
        max_side=meta.get("max_side"), hash_paths=meta.get("hash_paths", False), direct_io=cfg.direct_io,
        units=meta.get("units"), volumes=cfg.volumes)
    stats.add_time("convert", time.perf_counter() - start)
    stats.shards_written += sum(1 for r in results if not r["skipped"] and r["samples"])  # committed ones
    if failures:
        names = ", ".join(item[0] for item, _ in failures[:5])
        first = failures[0][1]
        raise JobFailed(f"{len(failures)} shard task(s) failed ({names}...): {type(first).__name__}: {first}; "
                        f"rerun the same command to retry them")
    return {r["name"]: r["samples"] for r in results if not r["skipped"]}


def _committed_samples(root: Path, modality: str, name: str) -> int:
    from shards.layout import manifest_path

    path = manifest_path(root, modality, name)
    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


def _write_plan_meta(root: Path, g: int, meta: dict) -> None:
    planning.write_plan_meta(root, g, meta)


def _clear_work(root: Path, g: int) -> None:
    shutil.rmtree(root / WORK_DIR / f"g{g:03d}", ignore_errors=True)  # empty-shard markers (and older plans' lists)
    shutil.rmtree(work_dir(root, g), ignore_errors=True)  # the plan's slice lists, with paths, beside the dataset
    remove_empty(root)
    try:
        (root / WORK_DIR).rmdir()
    except OSError:
        pass  # another generation still pending


def _convert_generation(client, root: Path, g: int, cfg: IngestConfig, salt: str, label_names: list[str],
                        stats: RunStats) -> None:
    from shards import ShardWriter

    meta = planning.read_plan_meta(root, g)
    # largest shards first (each modality's and split's last shard is a remainder): the workers then
    # run out of work together instead of one finishing a big shard while the others idle
    by_size = sorted(meta["shards"].items(), key=lambda kv: (-kv[1].get("est_bytes", 0), kv[0]))
    todo = [(name, info["modality"]) for name, info in by_size if not shard_done(root, g, info["modality"], name)]
    # "already committed" counts committed shards only, not the ones whose every slice failed
    pending = {name for name, _ in todo}
    stats.shards_skipped += sum(1 for name, info in by_size if name not in pending
                                and ShardWriter.is_committed(root, info["modality"], name))
    if todo:
        _log(f"generation g{g:03d}: {len(todo)} of {len(meta['shards'])} shard(s) to write")
    written = _convert_shards(client, root, g, todo, meta, cfg, salt, label_names, stats)
    missing = [n for n, info in meta["shards"].items() if not shard_done(root, g, info["modality"], n)]
    if missing:
        raise JobFailed(f"{len(missing)} shard(s) of g{g:03d} not committed; rerun the same command")
    # what each shard committed (0: every slice was rejected) is kept in the plan: a later run can then
    # tell a shard that lost its manifest part from one that never had samples (lost_shards)
    for name, info in meta["shards"].items():
        info["committed"] = written[name] if name in written else _committed_samples(root, info["modality"], name)
    meta.update(status="complete", completed=_now())
    _write_plan_meta(root, g, meta)
    _clear_work(root, g)


def lost_shards(root: Path) -> list[tuple[int, str, str]]:
    """(generation, shard, modality) of every shard of a complete generation that committed samples
    but has no manifest part now (deleted or lost): its samples are planned, so no later run would
    ingest them again; the shard must be rewritten."""
    from shards import ShardWriter

    lost = []
    for g in planning.generations(root):
        meta = planning.read_plan_meta(root, g)
        if meta.get("status") != "complete":
            continue
        for name, info in sorted(meta["shards"].items()):
            # plans written before "committed" was recorded: a shard that had no samples is simply redone
            if info.get("committed", 1) and not ShardWriter.is_committed(root, info["modality"], name):
                lost.append((g, name, info["modality"]))
    return lost


def _rewrite_lost(client, root: Path, lost: list[tuple[int, str, str]], scan_generation: int, cfg: IngestConfig,
                  salt: str, labels, label_names: list[str], stats: RunStats) -> dict[str, str]:
    """Rewrite lost shards under their own names from their plan records (the slices, their order and
    split) and this run's scan (generation `scan_generation`: where each source file is now). Returns
    {shard: why} of the shards that cannot be rewritten (their source files are not among this run's
    sources, or changed)."""
    import numpy as np
    import pyarrow.compute as pc

    from shards.atomic import write_parquet_atomically

    unrecoverable: dict[str, str] = {}
    by_gen: dict[int, list[tuple[str, str]]] = {}
    for g, name, modality in lost:
        by_gen.setdefault(g, []).append((name, modality))
    for g, shards in by_gen.items():
        meta = planning.read_plan_meta(root, g)
        # only the lost shards' records (in file order = each shard's write order), joined once with the
        # scan's rows of their own source files
        records = planning.shard_records(root, g, [n for n, _ in shards])
        inventory = _read_inventory(root, scan_generation, cfg.hash_paths, pc.unique(records.column("source_hash")))
        index = inventory.select(["source_hash", "path", "frames", "sop_hash", "series_hash", "study_hash",
                                  "patient_hash", "native_layout"]).rename_columns(
            ["source_hash", "path", "frames", "inv_sop_hash", "series_hash", "study_hash", "patient_hash",
             "native_layout"])
        # non-DICOM rows carry their labels (ingest.arrays); taken by row number: Arrow joins refuse list columns
        own_labels = inventory.column("labels")
        if own_labels.null_count == len(own_labels):
            own_labels = None  # none found by this scan (a --labels table not given again): as for DICOM
        index = index.append_column("_inv_row", pa.array(np.arange(inventory.num_rows), pa.int64()))
        records = records.append_column("_order", pa.array(np.arange(records.num_rows), pa.int64()))
        records = records.join(index, keys="source_hash", join_type="left outer").sort_by("_order")
        shutil.rmtree(root / WORK_DIR / f"g{g:03d}", ignore_errors=True)
        shutil.rmtree(work_dir(root, g), ignore_errors=True)
        todo = []
        for name, modality in shards:
            joined = records.filter(pc.equal(records.column("shard"), name))
            found = pc.fill_null(pc.equal(joined.column("inv_sop_hash"), joined.column("sop_hash")), False)
            n_missing = joined.num_rows - pc.sum(found.cast(pa.int64())).as_py() if joined.num_rows else 0
            if n_missing:
                unrecoverable[name] = (f"{n_missing} of its {joined.num_rows} slices come from files not found "
                                       f"(unchanged) by this run's scan")
                continue
            if label_names and labels is None and own_labels is None:
                unrecoverable[name] = "the dataset has labels: pass --labels to rewrite it"
                continue
            label_col = pa.nulls(joined.num_rows, pa.list_(pa.float32()))
            if own_labels is not None:
                label_col = own_labels.take(joined.column("_inv_row")).cast(pa.list_(pa.float32()))
            elif labels is not None:
                rows = joined.select(["sop_hash", "series_hash", "study_hash"]).to_pylist()
                label_col = pa.array([labels.lookup(r) for r in rows], pa.list_(pa.float32()))
            spec = pa.table({
                "path": joined.column("path"), "frame": joined.column("frame").cast(pa.int32()),
                "frames": joined.column("frames").cast(pa.int32()),
                **{c: joined.column(c) for c in ("sop_hash", "series_hash", "study_hash", "patient_hash",
                                                 "source_hash", "split")},
                "labels": label_col, "native_layout": joined.column("native_layout"),
                # the plan records keep the planned copy only; its duplicates were not rescanned as such
                "fallbacks": pa.nulls(joined.num_rows, pa.list_(pa.string())),
            }, schema=planning.SPEC_SCHEMA)
            write_parquet_atomically(spec, planning.spec_path(root, g, name))
            todo.append((name, modality))
            _log(f"shard {name} lost its manifest part: rewriting it from the plan of g{g:03d}")
        if todo:
            written = _convert_shards(client, root, g, todo, meta, cfg, salt, label_names, stats)
            for name, _ in todo:
                meta["shards"][name]["committed"] = written.get(name, 0)
            _write_plan_meta(root, g, meta)
        _clear_work(root, g)
    return unrecoverable


def _keep_unplanned_errors(root: Path, g: int) -> None:
    """A run that planned no shard leaves generation number g to the next run, which clears g's scan and
    plan error files and its path map: rename them out of its way first (`unplanned-<token>-<name>`, a
    name no generation clears or skips as its own, so later runs also do not report these inputs again;
    the map folder to `gNNN-unplanned-<token>`, still read by ingest.paths)."""
    base = root / ERRORS_DIR
    files = ([base / f"scan-g{g:03d}.parquet", *sorted(base.glob(f"scan-g{g:03d}-b*.parquet")),
              *sorted(base.glob(f"plan-g{g:03d}-b*.parquet"))] if base.is_dir() else [])
    kept = [p for p in files if p.exists() and pq.read_metadata(p).num_rows]
    if not kept:
        return
    token = uuid.uuid4().hex[:8]
    for path in kept:
        path.rename(base / f"unplanned-{token}-{path.name}")
    if generation_map_dir(root, g).is_dir():
        generation_map_dir(root, g).rename(generation_map_dir(root, g).with_name(f"g{g:03d}-unplanned-{token}"))


def _sources_hash(cfg: IngestConfig, salt: str) -> str:
    from shards import salted_hash

    # paths themselves stay out of the dataset; path text: a source name need not be UTF-8
    return salted_hash("\n".join(path_text(s) for s in cfg.sources), salt)


def _convert_item(item, volumes: bool = False, **kwargs):
    name, modality = item
    if volumes:
        from .volumes import run_volume_task

        # DICOM series take their units from their headers; `units` applies to NIfTI volumes only
        return run_volume_task(name=name, modality=modality, **kwargs)
    return run_convert_task(name=name, modality=modality, **kwargs)


def _scan_item(task, **kwargs):
    return run_scan_task(task, **kwargs)


def _scan_non_dicom_item(task, **kwargs):
    from .arrays import run_scan_task as run_non_dicom_scan_task
    from .paths import generation_map_dir, write_map

    result = run_non_dicom_scan_task(task, **kwargs)
    # as the DICOM scan task does: its rejections stay on the worker (error part), the client gets a count
    # (the map rows of rejected inputs are already in the task's map part)
    errors = result["errors"]
    if errors:
        planning.write_scan_error_part(planning.scan_error_part(kwargs["root"], kwargs["generation"], task.index), errors)
    result["errors"] = len(errors)
    return result


def dataset_kind(root: Path) -> str | None:
    """The kind ("slices" or "volumes") of the dataset at root, None when there is none yet: from
    ingest.json (written when the dataset was created), else from dataset.json or the shards."""
    from shards import Dataset

    if not (root / STATE_FILE).exists() and not (root / "dataset.json").exists():
        return None
    recorded = read_state(root).get("kind")
    try:
        return recorded or Dataset(root).kind
    except ValueError as e:  # shards of both kinds, or an unknown kind in dataset.json
        raise ConfigError(str(e)) from None


def check_out_folder(root: Path, sources: list[str], kind: str = "slices") -> None:
    """Refuse an --out that cannot be this job's dataset folder, before anything is created.

    A dataset holds one kind of sample: a job writing `kind` is refused on a dataset of the other kind.

    A folder is a dataset once the first run has written ingest.json (or dataset.json); before that the
    only entries a crashed first run leaves are its lock file. Anything else means the folder belongs to
    someone else, and ingest would mix its files into theirs (and a later `rm -r` of the dataset would
    delete them)."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root} exists and is not a folder")
    if not root.exists():  # found now, not after a cluster has started for nothing
        parent = root.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            why = "read-only file system" if os.statvfs(parent).f_flag & os.ST_RDONLY else "no write permission"
            raise ConfigError(f"cannot create dataset folder {root}: {parent} is not writable ({why})")
    if root.is_dir():
        try:
            entries = sorted(p.name for p in root.iterdir())
        except OSError as e:
            raise ConfigError(f"cannot read dataset folder {root}: {e.strerror or e}") from None
        existing = dataset_kind(root)
        if existing not in (None, kind):
            hint = "drop --volumes" if kind == "volumes" else "add --volumes"
            raise ConfigError(f"dataset {root} holds {existing}, this job writes {kind}: a dataset holds one kind "
                              f"(use another --out, or {hint})")
        if STATE_FILE not in entries and DATASET_JSON not in entries:
            foreign = [n for n in entries if n != LOCK_FILE and not n.startswith(f".{LOCK_FILE}.")]
            if foreign:
                raise ConfigError(f"--out {root} is a non-empty folder that is not a medswav dataset (it holds "
                                  f"{foreign[0]!r}" + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
                                  + "); choose a new or empty folder")
    real_out = os.path.realpath(root)
    for src in sources:
        if "://" in src and not src.startswith("file://"):
            continue
        real_src = os.path.realpath(src[len("file://"):] if src.startswith("file://") else src)
        if real_src == real_out or real_src.startswith(real_out.rstrip(os.sep) + os.sep):
            raise ConfigError(f"source {src} is the dataset folder --out {root} or lies inside it")


def own_folder_in_sources(root: Path, sources: list[str]) -> frozenset[str]:
    """The dataset folder as the scan's walk would reach it (normalised), for each source that holds it:
    the job must not ingest its own shards, manifests and temporaries. The same for what lives beside
    it (the path map and work files `DATASET.paths`, the salt file `DATASET.salt` and its check
    `DATASET.salt-check`), which a source holding the dataset folder holds too."""
    from .paths import map_dir
    from .salt import check_file

    found = set()
    for own in (root, map_dir(root), salt_file(root), check_file(root)):
        real_out = os.path.realpath(own)
        for src in sources:
            if "://" in src and not src.startswith("file://"):
                continue
            local = src[len("file://"):] if src.startswith("file://") else src
            real_src = os.path.realpath(local)
            if real_out.startswith(real_src.rstrip(os.sep) + os.sep):
                found.add(os.path.normpath(os.path.join(local, os.path.relpath(real_out, real_src))))
                found.add(os.path.normpath(real_out))
    return frozenset(found)


def make_dataset_folder(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create dataset folder {root}: {e.strerror or e}") from None


def _salt_without_creating(root: Path, cfg: IngestConfig) -> tuple[str, str] | None:
    """The salt, when finding it creates nothing (given, in the environment, in the salt file, or a
    dataset whose salt is missing, which is refused); None when the salt file is still to be made."""
    if cfg.salt or os.environ.get(ENV) or salt_file(root).exists() or (root / STATE_FILE).exists():
        return resolve_salt(root, cfg.salt)
    return None


def run(cfg: IngestConfig) -> tuple[dict, RunStats]:
    """Run the whole job; returns (dataset.json content, this run's counts).

    Order of effects: arguments and the --out folder are checked, then an existing dataset is locked
    (a second writer is refused before any cluster starts), then the cluster is connected; only then
    are the dataset folder, its lock and the salt file created, so that a job that cannot run
    (unreachable scheduler, ...) leaves nothing behind."""
    root = cfg.root
    missing = [s for s in cfg.sources if "://" not in s and not Path(s).exists()]
    if missing:  # fail before starting a cluster
        raise ConfigError(f"source not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    check_out_folder(root, list(cfg.sources), cfg.kind)
    exclude = own_folder_in_sources(root, list(cfg.sources))
    with ExitStack() as stack:
        lock = stack.enter_context(DatasetLock(root, cfg.lock_timeout)) if root.is_dir() else None
        known = _salt_without_creating(root, cfg)
        # non-DICOM sources (--modality) take a table keyed by path, read by their scan tasks (ingest.arrays)
        dicom_labels = cfg.labels if not cfg.modality else None
        if cfg.labels and cfg.modality:
            from .arrays import load_label_table

            load_label_table(str(cfg.labels))  # a bad table is refused before any cluster starts
        labels = planning.LabelTable.load(dicom_labels, known[0]) if dicom_labels and known else None
        client = stack.enter_context(dask_client(cfg))
        if lock is None:
            make_dataset_folder(root)
            lock = stack.enter_context(DatasetLock(root, cfg.lock_timeout))
            check_out_folder(root, list(cfg.sources), cfg.kind)  # another job may have filled it while we connected
        salt, origin = known or resolve_salt(root, cfg.salt)
        _log(f"salt: from {origin}")
        if dicom_labels and labels is None:
            labels = planning.LabelTable.load(dicom_labels, salt)
        return _run_locked(client, lock, root, cfg, salt, labels, exclude)


def check_path_privacy(root: Path, state: dict, hash_paths: bool) -> None:
    """A dataset keeps the path privacy it was built with: one half hashed and one half clear would be
    neither private nor fully readable."""
    if state.get("hash_paths", hash_paths) == hash_paths:
        return
    if hash_paths:
        raise ConfigError(f"dataset {root} was built with clear source paths inside (--keep-paths, or before "
                          f"hashing became the default): pass --keep-paths to extend or resume it")
    raise ConfigError(f"dataset {root} keeps source paths only as salted hashes: run without --keep-paths")


def _run_locked(client, lock: DatasetLock, root: Path, cfg: IngestConfig, salt: str, labels,
                exclude: frozenset[str]) -> tuple[dict, RunStats]:
    state = read_state(root)
    label_names = state.get("label_names", labels.names if labels else [])
    if labels and label_names != labels.names:
        raise ConfigError(f"labels file columns {labels.names} differ from the dataset's label names {label_names}")
    check_path_privacy(root, state, cfg.hash_paths)
    make_map_dir(root)  # beside the dataset: the plan's slice lists always, the path map unless --keep-paths
    if not state:
        write_state(root, {"label_names": label_names, "kind": cfg.kind,
                           "hash_paths": cfg.hash_paths, "created": _now(), "ingest_version": INGEST_VERSION})
    stats = RunStats()
    job_start = time.perf_counter()
    gens = planning.generations(root)
    resumed_sources = None
    for g in gens:
        meta = planning.read_plan_meta(root, g)
        if meta.get("status") != "complete":
            _log(f"resuming generation g{g:03d}")
            lock.check()
            _convert_generation(client, root, g, cfg, salt, label_names, stats)
            stats.generations.append(g)
            resumed_sources = meta.get("sources_hash")
    lost = lost_shards(root)
    unrecoverable: dict[str, str] = {}
    if resumed_sources == _sources_hash(cfg, salt) and not cfg.rescan and not lost:
        _log("sources unchanged since the resumed generation: not rescanning (--rescan to force)")
    else:
        unrecoverable = _scan_plan_convert(client, lock, root, cfg, salt, labels, label_names, stats, exclude, lost)
    lock.check()
    if unrecoverable:  # dataset.json is left as it was: its sample count must not shrink
        names = sorted(unrecoverable)
        raise JobFailed(f"{len(names)} committed shard(s) lost their manifest part and cannot be rewritten: "
                        + "; ".join(f"{n}: {unrecoverable[n]}" for n in names[:5])
                        + (" ..." if len(names) > 5 else "")
                        + "; rerun with the sources (and labels) they were built from, or restore the manifest parts")
    finalize_start = time.perf_counter()
    summary = finalize(root, {
        "version": INGEST_VERSION, "generations": planning.generations(root), "hash_paths": cfg.hash_paths,
        "val_fraction": cfg.val_fraction, "seed": cfg.seed, "shard_size": cfg.shard_size,
        "max_side": cfg.max_side,
        "modality_map": {**planning.MODALITY_MAP, **{k.upper(): v for k, v in cfg.modality_map.items()}},
    }, kind=cfg.kind)
    stats.add_time("finalize", time.perf_counter() - finalize_start)
    stats.job_seconds = time.perf_counter() - job_start  # the cluster's start and shutdown excluded
    return summary, stats


def _non_dicom_label_names(root: Path, results: list[dict], label_names: list[str]) -> list[str]:
    """The label names of a non-DICOM scan (its .npz sources' or its --labels table's), checked against
    each other and the dataset's; recorded in the dataset's state when it has none yet."""
    found: dict[str, list[str]] = {}
    for r in results:
        found.update(r["label_names"])
    distinct = sorted({tuple(v) for v in found.values()})
    if len(distinct) > 1:
        raise ConfigError(f"the .npz sources have different label columns ({' vs '.join(map(str, distinct[:2]))}); "
                          f"ingest them into separate datasets")
    table_names = results[0]["path_label_names"] if results else []
    npz_names = list(distinct[0]) if distinct else []
    if table_names and npz_names and table_names != npz_names:
        raise ConfigError(f"--labels columns {table_names} differ from the .npz label columns {npz_names}")
    names = table_names or npz_names
    if names != label_names:
        if planning.generations(root):
            raise ConfigError(f"label columns {names} differ from the dataset's label names {label_names}")
        write_state(root, {**read_state(root), "label_names": names})
    return names


def _scan_plan_convert(client, lock: DatasetLock, root: Path, cfg: IngestConfig, salt: str, labels, label_names,
                       stats: RunStats, exclude: frozenset[str], lost: list[tuple[int, str, str]]) -> dict[str, str]:
    """Scan, rewrite lost shards, plan and convert a new generation. Returns the lost shards that could
    not be rewritten ({shard: why})."""
    gens = planning.generations(root)
    g = gens[-1] + 1 if gens else 0
    for stale in (root / INVENTORY_DIR).glob(f"part-g{g:03d}-*.parquet"):
        stale.unlink()  # from an interrupted scan of this same generation
    shutil.rmtree(root / WORK_DIR / f"g{g:03d}", ignore_errors=True)
    shutil.rmtree(generation_map_dir(root, g), ignore_errors=True)  # the map of that interrupted scan
    shutil.rmtree(work_dir(root, g), ignore_errors=True)  # with the scan's error parts
    planning.clear_scan_errors(root, g)
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    try:
        tasks = scan_tasks(list(cfg.sources), target_tasks=SCAN_TASKS_PER_WORKER * n_workers,
                           files_per_task=cfg.files_per_scan_task, exclude=exclude)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    token = uuid.uuid4().hex[:8]
    start = time.perf_counter()
    scan_fn, scan_kwargs, modality_map = _scan_item, {}, cfg.modality_map
    if cfg.modality:  # non-DICOM sources: the same phases, their images listed by ingest.arrays
        from .arrays import MODALITY_CODES

        scan_fn = _scan_non_dicom_item
        scan_kwargs = dict(modality=cfg.modality, sources=[str(s) for s in cfg.sources],
                           labels_path=str(cfg.labels) if cfg.labels else None, volumes=cfg.volumes)
        modality_map = {**cfg.modality_map, **{code: m for m, code in MODALITY_CODES.items()}}
    results, failures = run_phase(client, "scan", scan_fn, tasks, key_of=lambda t: f"{t.name}-g{g:03d}-{token}",
                                  progress=cfg.progress, root=str(root), generation=g, salt=salt,
                                  hash_paths=cfg.hash_paths, exclude=exclude, **scan_kwargs)
    if failures:
        raise JobFailed(f"{len(failures)} scan task(s) failed: {failures[0][1]}; rerun the same command")
    stats.files = sum(r["files"] for r in results)
    rejections = sum(r["errors"] for r in results)
    scan_rejected = 0
    if rejections:  # merged on the workers: the client sums counts
        buckets = planning.scan_error_buckets(rejections)
        merged, failures = run_phase(client, "scan: errors", planning.merge_scan_errors, list(range(buckets)),
                                     key_of=lambda b: f"scan-errors-{b}-g{g:03d}-{token}", progress=cfg.progress,
                                     root=str(root), generation=g, buckets=buckets)
        if failures:
            raise JobFailed(f"{len(failures)} scan error task(s) failed: {failures[0][1]}; rerun the same command")
        scan_rejected = sum(merged)
    inventory_rows = sum(r.get("rows", r["files"]) for r in results)  # non-DICOM: one row per image
    if cfg.modality:
        label_names = _non_dicom_label_names(root, results, label_names)
    stats.add_time("scan", time.perf_counter() - start)
    start = time.perf_counter()
    unrecoverable = {}
    if lost:
        lock.check()
        unrecoverable = _rewrite_lost(client, root, lost, g, cfg, salt, labels, label_names, stats)
    try:
        plan = planning.plan_generation(
            client, root, g, rows=inventory_rows, modality_map=modality_map, max_pixel_bytes=cfg.max_pixel_bytes,
            max_side=cfg.max_side, shard_size=cfg.shard_size, frames_per_unit=cfg.frames_per_unit,
            val_fraction=cfg.val_fraction, seed=cfg.seed, salt=salt, hash_paths=cfg.hash_paths,
            labels_path=str(cfg.labels) if cfg.labels and not cfg.modality else None, progress=cfg.progress,
            token=token, volumes=cfg.volumes)
    except planning.PlanFailed as e:
        raise JobFailed(f"{e}; rerun the same command") from None
    stats.new_slices, stats.already_ingested = plan.slices, plan.already_ingested
    _log(f"plan g{g:03d}: {stats.files:,} files, {plan.slices:,} new slices in {len(plan.shards):,} shard(s), "
         f"{stats.already_ingested:,} already ingested, {scan_rejected + plan.rejected:,} rejected")
    if not plan.shards:
        _keep_unplanned_errors(root, g)  # before the number is reused: the rejections of this run stay recorded
        planning.clear_generation_plan(root, g)  # records of nothing; this generation number is reused
        _clear_work(root, g)  # the planning work files beside the dataset (they hold paths)
        stats.add_time("plan", time.perf_counter() - start)
        return unrecoverable
    lock.check()
    _write_plan_meta(root, g, {
        "sources_hash": _sources_hash(cfg, salt), "created": _now(), "status": "pending", "seed": cfg.seed,
        "shard_size": cfg.shard_size, "max_side": cfg.max_side, "hash_paths": cfg.hash_paths,
        "label_names": label_names, "config": {k: v for k, v in asdict(cfg).items() if k not in ("salt", "sources", "out", "labels")},
        "generation": g, "shards": plan.shards, "slices": plan.slices,
        **({"non_dicom_modality": cfg.modality, "units": cfg.units or "raw"} if cfg.modality else {}),
    })
    stats.add_time("plan", time.perf_counter() - start)
    _convert_generation(client, root, g, cfg, salt, label_names, stats)
    stats.generations.append(g)
    return unrecoverable
