"""The Dask side: connect to a cluster (or start one) and run a phase's tasks with a progress bar."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .config import ConfigError, IngestConfig

WORKER_MALLOC_THRESHOLD = 256 * 2**20


def _warm_imports() -> None:
    import pyarrow.acero  # noqa: F401  planning's joins, sorts and datasets (~50 ms on a worker's first plan task)
    import pyarrow.compute  # noqa: F401
    import pyarrow.dataset  # noqa: F401
    import pydicom.pixels  # noqa: F401  decoders and plugins
    import shards.dataset  # noqa: F401  error parts (plan, convert)
    import shards.writer  # noqa: F401
    import webdataset  # noqa: F401  (imports torch when installed: seconds per process)

    from . import convert, finalize, header, plan, scan  # noqa: F401


@contextmanager
def dask_client(cfg: IngestConfig) -> Iterator[Any]:
    """`--scheduler ADDRESS` connects to a running cluster; otherwise an embedded LocalCluster
    with `--workers N` single-threaded worker processes (pydicom decoding holds the GIL)."""
    import dask
    from distributed import Client, LocalCluster

    dask.config.set({
        # workers that die mid-task are replaced and the task rerun elsewhere; shard names make reruns idempotent
        "distributed.scheduler.allowed-failures": 5,
        # Dask's default MALLOC_TRIM_THRESHOLD_=64KiB also disables glibc's adaptive mmap threshold, so every
        # decoded slice (~0.5 MB) is a fresh mmap + page faults: ~50% more CPU per slice. Large thresholds
        # keep those buffers in the heap. (Set the same variables for `dask worker`, see the README.)
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": WORKER_MALLOC_THRESHOLD,
        "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": WORKER_MALLOC_THRESHOLD,
        "distributed.worker.profile.enabled": False,  # the 10 ms sampling profiler costs CPU on every worker
        # tasks here run for seconds: the 20 ms event-loop tick, 0.5 s system sampling and work stealing
        # (queued tasks already go to whichever worker frees first) cost the client and scheduler ~5% of
        # a core, which on a small machine is taken from the workers
        "distributed.admin.tick.interval": "500ms",
        "distributed.admin.system-monitor.interval": "2s",
        "distributed.scheduler.work-stealing": False,
    })
    if cfg.scheduler:
        try:
            client = Client(cfg.scheduler, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise ConfigError(f"cannot reach Dask scheduler at {cfg.scheduler}: {e}") from None
        cluster = None
    else:
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                               dashboard_address=cfg.dashboard_address, silence_logs=40)
        client = Client(cluster)
    try:
        if cfg.scheduler:
            try:
                client.wait_for_workers(1, timeout=60)
            except (TimeoutError, OSError):
                raise ConfigError(f"no Dask worker connected to {cfg.scheduler} within 60 s") from None
        # import the heavy modules once per worker now, in parallel, rather than inside the first tasks
        try:
            client.run(_warm_imports)
        except ImportError as e:
            raise ConfigError(f"Dask workers cannot import the ingestion code ({e}); install medswav on them") from None
        n = len(client.scheduler_info().get("workers", {}))
        where = cfg.scheduler or f"local cluster, {cfg.workers} worker process(es)"
        print(f"dask: {where}; {n} worker(s) connected; dashboard: {client.dashboard_link}", file=sys.stderr)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_phase(client, desc: str, fn: Callable, items: list, key_of: Callable[[Any], str], progress: bool,
              **kwargs) -> tuple[list, list[tuple[Any, BaseException]]]:
    """Submit fn(item, **kwargs) per item (task key from the item's identity); collect results as they
    finish. Returns (results, failures); a failing task does not stop the others."""
    from distributed import as_completed
    from tqdm import tqdm

    if not items:
        return [], []
    futures = {}
    for rank, item in enumerate(items):  # started in the order given (callers put the longest first)
        fut = client.submit(fn, item, key=key_of(item), pure=False, priority=len(items) - rank, **kwargs)
        futures[fut] = item
    results, failures = [], []
    with tqdm(total=len(futures), desc=desc, unit="task", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for fut in as_completed(futures):
            try:
                results.append(fut.result())
            except Exception as e:  # noqa: BLE001 - reported per task by the caller
                failures.append((futures[fut], e))
            bar.update(1)
            fut.release()
    return results, failures
