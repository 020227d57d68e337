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
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import plan as planning
from .config import ConfigError, IngestConfig
from .convert import run_convert_task, shard_done
from .engine import dask_client, run_phase
from .finalize import finalize, report
from .salt import read_state, resolve_salt, write_state
from .scan import INVENTORY_DIR, INVENTORY_SCHEMA, WORK_DIR, run_scan_task, scan_tasks

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


def _read_inventory(root: Path, g: int, hash_paths: bool) -> pa.Table:
    parts = sorted((root / INVENTORY_DIR).glob(f"part-g{g:03d}-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else INVENTORY_SCHEMA.empty_table()
    table = _first_per_source(table)  # overlapping sources (/a and /a/b) list some files twice
    if not hash_paths:
        return table.append_column("path", table.column("source"))
    pparts = sorted((root / WORK_DIR / f"g{g:03d}" / "paths").glob("part-*.parquet"))
    if not pparts:
        return table.append_column("path", pa.array([""] * table.num_rows, pa.string()))
    paths = _first_per_source(pa.concat_tables([pq.read_table(p) for p in pparts]))
    return table.join(paths, keys="source_hash", join_type="left outer")  # adds "path"


def _first_per_source(table: pa.Table) -> pa.Table:
    import numpy as np
    import pyarrow.compute as pc

    if table.num_rows < 2:
        return table
    table = table.take(pc.sort_indices(table, sort_keys=[("source_hash", "ascending")]))
    hashes = table.column("source_hash")
    repeat = np.zeros(table.num_rows, dtype=bool)
    repeat[1:] = pc.equal(hashes.slice(1), hashes.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(~repeat)) if repeat.any() else table


def _previous_error_keys(root: Path, skip_prefixes: tuple[str, ...]) -> set[tuple[str, str]]:
    base = root / "errors"
    seen: set[tuple[str, str]] = set()
    if not base.is_dir():
        return seen
    for p in base.glob("*.parquet"):
        if p.stem.startswith(skip_prefixes):
            continue
        t = pq.read_table(p, columns=["source", "reason"])
        seen.update(zip(t.column("source").to_pylist(), t.column("reason").to_pylist()))
    return seen


def _convert_generation(client, root: Path, g: int, cfg: IngestConfig, salt: str, label_names: list[str],
                        stats: RunStats) -> None:
    meta = planning.read_plan_meta(root, g)
    # largest shards first (each modality's and split's last shard is a remainder): the workers then
    # run out of work together instead of one finishing a big shard while the others idle
    by_size = sorted(meta["shards"].items(), key=lambda kv: (-kv[1].get("est_bytes", 0), kv[0]))
    todo = [(name, info["modality"]) for name, info in by_size if not shard_done(root, g, info["modality"], name)]
    stats.shards_skipped += len(meta["shards"]) - len(todo)
    if todo:
        _log(f"generation g{g:03d}: {len(todo)} of {len(meta['shards'])} shard(s) to write")
    token = uuid.uuid4().hex[:8]
    start = time.perf_counter()
    results, failures = run_phase(
        client, f"convert g{g:03d}", _convert_item, todo, key_of=lambda it: f"convert-{it[0]}-{token}",
        progress=cfg.progress, root=str(root), generation=g, label_names=label_names, salt=salt,
        max_side=meta.get("max_side"), hash_paths=meta.get("hash_paths", False), direct_io=cfg.direct_io)
    stats.add_time("convert", time.perf_counter() - start)
    stats.shards_written += sum(1 for r in results if not r["skipped"])
    if failures:
        names = ", ".join(item[0] for item, _ in failures[:5])
        first = failures[0][1]
        raise JobFailed(f"{len(failures)} shard task(s) failed ({names}...): {type(first).__name__}: {first}; "
                        f"rerun the same command to retry them")
    missing = [n for n, info in meta["shards"].items() if not shard_done(root, g, info["modality"], n)]
    if missing:
        raise JobFailed(f"{len(missing)} shard(s) of g{g:03d} not committed; rerun the same command")
    meta.update(status="complete", completed=_now())
    path = planning.plan_meta_path(root, g)
    tmp = path.with_name(f".{path.name}.tmp")
    import json

    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    shutil.rmtree(root / WORK_DIR / f"g{g:03d}", ignore_errors=True)  # clear source paths of the plan
    try:
        (root / WORK_DIR).rmdir()
    except OSError:
        pass  # another generation still pending


def _sources_hash(cfg: IngestConfig, salt: str) -> str:
    from shards import salted_hash

    return salted_hash("\n".join(cfg.sources), salt)  # paths themselves stay out of the dataset


def _convert_item(item, **kwargs):
    name, modality = item
    return run_convert_task(name=name, modality=modality, **kwargs)


def _scan_item(task, **kwargs):
    return run_scan_task(task, **kwargs)


def run(cfg: IngestConfig) -> tuple[dict, RunStats]:
    """Run the whole job; returns (dataset.json content, this run's counts)."""
    root = cfg.root
    missing = [s for s in cfg.sources if "://" not in s and not Path(s).exists()]
    if missing:  # fail before starting a cluster
        raise ConfigError(f"source not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    root.mkdir(parents=True, exist_ok=True)
    salt, origin = resolve_salt(root, cfg.salt)
    _log(f"salt: from {origin}")
    state = read_state(root)
    labels = planning.LabelTable.load(cfg.labels, salt) if cfg.labels else None
    label_names = state.get("label_names", labels.names if labels else [])
    if labels and label_names != labels.names:
        raise ConfigError(f"labels file columns {labels.names} differ from the dataset's label names {label_names}")
    if "hash_paths" in state and state["hash_paths"] != cfg.hash_paths:
        raise ConfigError(f"dataset {root} was built with hash_paths={state['hash_paths']}; keep that setting")
    if not state:
        write_state(root, {"label_names": label_names,
                           "hash_paths": cfg.hash_paths, "created": _now(), "ingest_version": INGEST_VERSION})
    stats = RunStats()
    with dask_client(cfg) as client:
        job_start = time.perf_counter()
        gens = planning.generations(root)
        resumed_sources = None
        for g in gens:
            meta = planning.read_plan_meta(root, g)
            if meta.get("status") != "complete":
                _log(f"resuming generation g{g:03d}")
                _convert_generation(client, root, g, cfg, salt, label_names, stats)
                stats.generations.append(g)
                resumed_sources = meta.get("sources_hash")
        if resumed_sources == _sources_hash(cfg, salt) and not cfg.rescan:
            _log("sources unchanged since the resumed generation: not rescanning (--rescan to force)")
        else:
            _scan_plan_convert(client, root, cfg, salt, labels, label_names, stats)
        finalize_start = time.perf_counter()
        summary = finalize(root, {
            "version": INGEST_VERSION, "generations": planning.generations(root), "hash_paths": cfg.hash_paths,
            "val_fraction": cfg.val_fraction, "seed": cfg.seed, "shard_size": cfg.shard_size,
            "max_side": cfg.max_side,
            "modality_map": {**planning.MODALITY_MAP, **{k.upper(): v for k, v in cfg.modality_map.items()}},
        })
        stats.add_time("finalize", time.perf_counter() - finalize_start)
        stats.job_seconds = time.perf_counter() - job_start  # the cluster's start and shutdown excluded
    return summary, stats


def _scan_plan_convert(client, root: Path, cfg: IngestConfig, salt: str, labels, label_names, stats) -> None:
    from shards import write_errors

    gens = planning.generations(root)
    g = gens[-1] + 1 if gens else 0
    for stale in (root / INVENTORY_DIR).glob(f"part-g{g:03d}-*.parquet"):
        stale.unlink()  # from an interrupted scan of this same generation
    shutil.rmtree(root / WORK_DIR / f"g{g:03d}", ignore_errors=True)
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    try:
        tasks = scan_tasks(list(cfg.sources), target_tasks=SCAN_TASKS_PER_WORKER * n_workers,
                           files_per_task=cfg.files_per_scan_task)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    token = uuid.uuid4().hex[:8]
    start = time.perf_counter()
    results, failures = run_phase(client, "scan", _scan_item, tasks, key_of=lambda t: f"{t.name}-g{g:03d}-{token}",
                                  progress=cfg.progress, root=str(root), generation=g, salt=salt,
                                  hash_paths=cfg.hash_paths)
    if failures:
        raise JobFailed(f"{len(failures)} scan task(s) failed: {failures[0][1]}; rerun the same command")
    stats.files = sum(r["files"] for r in results)
    stats.add_time("scan", time.perf_counter() - start)
    start = time.perf_counter()
    inventory = _read_inventory(root, g, cfg.hash_paths)
    from .scan import shown_source

    plan, specs = planning.make_plan(
        inventory, generation=g, modality_map=cfg.modality_map, max_pixel_bytes=cfg.max_pixel_bytes,
        max_side=cfg.max_side, shard_size=cfg.shard_size, frames_per_unit=cfg.frames_per_unit,
        val_fraction=cfg.val_fraction, seed=cfg.seed, previous=planning.previous_frames(root), labels=labels,
        shown=lambda r: shown_source(r["path"], salt, cfg.hash_paths))
    stats.new_slices, stats.already_ingested = plan.slices, plan.already_ingested
    seen = _previous_error_keys(root, (f"scan-g{g:03d}", f"plan-g{g:03d}"))
    scan_errors = list({(e["source"], e["reason"]): e for r in results for e in r["errors"]
                        if (e["source"], e["reason"]) not in seen}.values())
    plan_errors = [e for e in plan.errors if (e["source"], e["reason"]) not in seen]
    write_errors(root, f"scan-g{g:03d}", scan_errors)
    write_errors(root, f"plan-g{g:03d}", plan_errors)
    _log(f"plan g{g:03d}: {stats.files:,} files, {plan.slices:,} new slices in {len(plan.shards):,} shard(s), "
         f"{stats.already_ingested:,} already ingested, {len(scan_errors) + len(plan_errors):,} rejected")
    if not plan.shards:
        stats.add_time("plan", time.perf_counter() - start)
        return
    planning.write_plan(root, plan, specs, {
        "sources_hash": _sources_hash(cfg, salt), "created": _now(), "status": "pending", "seed": cfg.seed,
        "shard_size": cfg.shard_size, "max_side": cfg.max_side, "hash_paths": cfg.hash_paths,
        "label_names": label_names, "config": {k: v for k, v in asdict(cfg).items() if k not in ("salt", "sources", "out", "labels")},
    })
    stats.add_time("plan", time.perf_counter() - start)
    _convert_generation(client, root, g, cfg, salt, label_names, stats)
    stats.generations.append(g)
