"""Ingestion throughput against a naive baseline and the decode limit, on a corpus cloned from real DICOM.

    python -m benchmarks.ingest [--quick] [--json PATH] [--keep DIR] [--out DIR] [--repeat N] [--no-pin]

Corpus: real files (KiTS CT 512x512 int16, MPRAGE MR 256x256, pydicom-data CR 1955x1841 MONOCHROME1,
all uncompressed: the hardest case for our overhead, since decoding is cheapest there) cloned with fresh
SOP / series / study instance UIDs and patient IDs (same lengths, patched in place), grouped into
realistic series and patients so that the split and the shuffle do real work. Mix ~70% CT, 28% MR, 2% CR.

One run measures (a) the naive baseline: serial dcmread + pixel_array + np.save per slice; (b) the
decode limit: serial dcmread + pixel_array only, nothing written (what one core can do at best);
(c) `ingest` with 1 and with 2 workers (embedded LocalCluster), timed from the connected cluster to
the written dataset.json (scan + plan + convert + finalize; the cluster's start and shutdown reported
separately). Each configuration runs on as many cores as it has workers (client, scheduler and kernel
work included), the serial baselines on one core: "per worker" means per core. Every round measures
all of them back to back; the figures are medians over the rounds. The storage line is the output
folder's write rate through shards.ShardFile, from one writer and from two at once (1 GB each); the
shards' write rate while converting is printed beside it: when 2 workers' convert writes at (nearly)
what two writers get, the disk, not ingestion, sets the 2-worker figure and the scaling.
"""
from __future__ import annotations

import glob
import os
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ._common import parser, print_table, write_json

SHARED = Path(os.environ.get("MEDSWAV_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
UID_ROOT = "1.2.826.0.1.3680043.10.543."  # a private test prefix; the rest is filled with digits


def _sources() -> dict[str, tuple[list[str], int]]:
    """modality -> (template files of one series, slices per series)."""
    from pydicom.data import get_testdata_file

    dicom = SHARED / "dicom"
    if not dicom.is_dir():
        dicom = Path("/work/shared/data/dicom")
    ct = sorted(glob.glob(str(dicom / "ct_kits_abdomen_18" / "*.dcm")))
    mr = sorted(glob.glob(str(dicom / "mr_mprage_sagittal_192" / "*.dcm")))
    cr = [get_testdata_file("RG1_UNCI.dcm")]
    if not ct or not mr:
        raise SystemExit(f"benchmarks.ingest: real DICOM not found under {dicom} (set MEDSWAV_SHARED_DATA)")
    return {"ct": (ct, len(ct)), "mr": (mr, len(mr)), "cr": (cr, 1)}


def _uid_like(old: str, counter: int) -> str:
    digits = str(counter)
    fill = len(old) - len(UID_ROOT) - len(digits)
    if fill < 0:
        raise ValueError(f"UID {old} too short to clone")
    return UID_ROOT + "1" * fill + digits  # same length: the file is patched in place


def _identities(path: str) -> dict[str, str]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {k: str(ds.get(k, "")) for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID")}


def _template_bytes(path: str, syntax: str) -> bytes:
    if syntax == "native":
        return open(path, "rb").read()
    import io

    import pydicom
    from pydicom.uid import JPEGLSLossless

    ds = pydicom.dcmread(path)
    ds.compress(JPEGLSLossless, generate_instance_uid=False)  # lossless: same pixels, same UIDs (patched below)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def build_corpus(folder: Path, n_slices: int, syntax: str = "native") -> dict:
    """Clone the templates into `folder` until about n_slices slices; returns counts and bytes."""
    shares = {"ct": 0.70, "mr": 0.28, "cr": 0.02}
    sources = _sources()
    counter = 10**6
    count = {"ct": 0, "mr": 0, "cr": 0}
    total_bytes = 0
    for modality, (files, per_series) in sources.items():
        target = max(per_series, int(n_slices * shares[modality]))
        templates = [(f, _template_bytes(f, syntax), _identities(f)) for f in files]
        series = 0
        while count[modality] + len(templates) <= target or count[modality] == 0:
            patient = series // 2  # two series per patient for CT/MR: the split is per patient
            out_dir = folder / modality / f"p{patient:05d}" / f"s{series:05d}"
            out_dir.mkdir(parents=True, exist_ok=True)
            counter += 1
            series_ids = {}
            for i, (f, data, ids) in enumerate(templates):
                for key in ("SeriesInstanceUID", "StudyInstanceUID"):
                    series_ids.setdefault(ids[key], _uid_like(ids[key], counter * 10 + (key == "StudyInstanceUID")))
                counter += 1
                new = {ids["SOPInstanceUID"]: _uid_like(ids["SOPInstanceUID"], counter), **series_ids}
                pid = ids["PatientID"]
                if pid:
                    new[pid] = f"P{patient:0{len(pid) - 1}d}"[-len(pid):] if len(pid) > 1 else pid
                blob = data
                for old, repl in new.items():
                    if old and len(old) == len(repl):
                        blob = blob.replace(old.encode(), repl.encode())
                (out_dir / f"{i:04d}.dcm").write_bytes(blob)
                total_bytes += len(blob)
            count[modality] += len(templates)
            series += 1
    return {"slices": sum(count.values()), "per_modality": count, "bytes": total_bytes}


def _files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.dcm"))


def warm_cache(files: list[str]) -> None:
    """Read every file once so that each measured pass starts with the corpus in the page cache
    (the naive pass writes as much as it reads and can evict it)."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 22):
                pass


@contextmanager
def on_cores(n: int | None):
    """Run the block (and every process it starts) on the first n cores this process may use; None: all.

    Without it, "1 worker" would also get the idle second core for its writer thread, the kernel's
    page-cache work, the Dask scheduler and the client, which 2 workers then have to share: each
    configuration gets exactly as many cores as it has workers, and the serial baselines one core."""
    if n is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:n])
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def naive_baseline(files: list[str], out: Path) -> float:
    import pydicom

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, f in enumerate(files):
        np.save(out / f"{i:07d}.npy", pydicom.dcmread(f).pixel_array)
    return time.perf_counter() - start


def decode_limit(files: list[str]) -> float:
    import pydicom

    start = time.perf_counter()
    for f in files:
        pydicom.dcmread(f).pixel_array
    return time.perf_counter() - start


def durable_write_rate(folder: Path, size: int = 512 << 20, writers: int = 1) -> float:
    """Bytes/s that `folder` takes through shards.ShardFile (how shards are written), fsync included,
    from `writers` files written at once (as many as ingest has workers), `size` bytes each."""
    import threading

    from shards.shardfile import ShardFile

    paths = [folder / f".medswav-write-test-{i}" for i in range(writers)]
    block = np.random.default_rng(0).integers(0, 255, size=8 << 20, dtype=np.uint8).tobytes()

    def write(path: Path) -> None:
        f = ShardFile(path)
        for _ in range(size // len(block)):
            f.write(block)
        f.close(sync=True)

    threads = [threading.Thread(target=write, args=(path,)) for path in paths]
    start = time.perf_counter()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return writers * size / (time.perf_counter() - start)
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def ingest_once(corpus: Path, out: Path, workers: int, shard_size: str) -> dict:
    from ingest.config import build_config
    from ingest.job import run

    cfg = build_config(sources=[str(corpus)], out=str(out), workers=workers, salt="medswav-benchmark-salt",
                       shard_size=shard_size, dashboard_address=":0", progress=False)
    start = time.perf_counter()
    summary, stats = run(cfg)
    total = time.perf_counter() - start
    return {"total_s": total, "job_s": stats.job_seconds, "start_stop_s": total - stats.job_seconds,
            "phases": stats.phase_seconds, "samples": summary["samples"], "bytes": summary["bytes"]}


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, help="corpus size (default 20000, --quick 1500; jpegls: 4000 / 400)")
    p.add_argument("--syntax", choices=("native", "jpegls"), default="native",
                   help="corpus transfer syntax: native = uncompressed as the sources (decode is cheapest, so "
                        "our overhead shows most); jpegls = re-encoded JPEG-LS lossless, as many archives store (default native)")
    p.add_argument("--keep", metavar="DIR", help="work folder to keep (default: a temporary folder, removed)")
    p.add_argument("--repeat", type=int, default=3, metavar="N",
                   help="rounds of all measurements; the figures are medians (default 3)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not restrict each configuration to as many cores as it has workers (the serial "
                        "baselines to one): 1 worker then also uses the idle core for its helpers")
    p.add_argument("--out", metavar="DIR", help="where the ingested datasets are written (default: the work "
                   "folder). Each shard is fsynced before its commit, so a slow disk caps the rate: the "
                   "storage line of the table shows that cap")
    args = p.parse_args(argv)
    n = args.slices or {("native", True): 1500, ("native", False): 20000,
                        ("jpegls", True): 400, ("jpegls", False): 4000}[(args.syntax, bool(args.quick))]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="medswav-bench-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = work / "corpus"
        shutil.rmtree(corpus, ignore_errors=True)
        t0 = time.perf_counter()
        info = build_corpus(corpus, n, args.syntax)
        files = _files(corpus)
        print(f"corpus ({args.syntax}): {info['slices']:,} slices {info['per_modality']}, {info['bytes'] / 1e9:.2f} GB "
              f"(built in {time.perf_counter() - t0:.1f} s) in {corpus}")
        # ~32 shards: enough tasks that 2 workers finish together (at 1e8 slices, 1 GB shards give ~5e4 tasks)
        shard_size = str(max(8 * 10**6, int(info["bytes"] * 1.2 / 32)))
        out_root = Path(args.out) if args.out else work
        out_root.mkdir(parents=True, exist_ok=True)
        slices = info["slices"]
        rounds = []
        one_core = None if args.no_pin else 1
        for r in range(args.repeat):
            # every round measures all of them back to back, so that each ratio compares like with like
            # on a machine whose speed drifts (shared VM: CPU, page cache and disk all vary by +-30%)
            warm_cache(files)
            with on_cores(one_core):
                decode_s = decode_limit(files)
            warm_cache(files)
            with on_cores(one_core):
                naive_s = naive_baseline(files, work / "naive")
            shutil.rmtree(work / "naive", ignore_errors=True)
            storage_bps = durable_write_rate(out_root)
            storage_2_bps = durable_write_rate(out_root, size=1 << 30, writers=2)
            runs = {}
            for workers in (1, 2):
                out = out_root / f"ds-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                for beside in (".salt", ".salt-check"):  # the salt and its check live next to the dataset
                    Path(str(out) + beside).unlink(missing_ok=True)
                shutil.rmtree(Path(str(out) + ".paths"), ignore_errors=True)  # the path map beside it
                warm_cache(files)
                with on_cores(None if args.no_pin else workers):
                    runs[workers] = ingest_once(corpus, out, workers, shard_size)
                assert runs[workers]["samples"] == slices, runs[workers]
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(Path(str(out) + ".paths"), ignore_errors=True)
            one, two = slices / runs[1]["job_s"], slices / runs[2]["job_s"]
            rounds.append({"decode_limit": slices / decode_s, "naive": slices / naive_s, "storage_bps": storage_bps,
                           "storage_2_bps": storage_2_bps,
                           "convert_bps_1": runs[1]["bytes"] / runs[1]["phases"]["convert"],
                           "convert_bps_2": runs[2]["bytes"] / runs[2]["phases"]["convert"],
                           "one": one, "two": two, "ratio": one * decode_s / slices, "scaling": two / one,
                           "runs": runs})
            print(f"round {r + 1}/{args.repeat}: decode limit {slices / decode_s:,.0f}, naive {slices / naive_s:,.0f}, "
                  f"ingest 1 worker {one:,.0f}, 2 workers {two:,.0f} slices/s; storage {storage_bps / 1e6:,.0f} MB/s "
                  f"(2 writers {storage_2_bps / 1e6:,.0f}), 2 workers' convert wrote {rounds[-1]['convert_bps_2'] / 1e6:,.0f} MB/s; "
                  f"ratio {rounds[-1]['ratio']:.3f}, scaling {rounds[-1]['scaling']:.3f}", flush=True)

        def median(key):
            return statistics.median(x[key] for x in rounds)

        def median_phases(workers):
            names = rounds[0]["runs"][workers]["phases"]
            return {k: statistics.median(x["runs"][workers]["phases"][k] for x in rounds) for k in names}

        limit, naive, storage_bps = median("decode_limit"), median("naive"), median("storage_bps")
        per_worker, two = median("one"), median("two")
        runs = rounds[0]["runs"]
        shard_bytes_per_slice = runs[1]["bytes"] / slices
        figures = {
            "slices": slices,
            "rounds": args.repeat,
            "storage_write_MBps": storage_bps / 1e6,
            "storage_write_MBps_2_writers": median("storage_2_bps") / 1e6,
            # while converting, the shards' write rate: near the 2-writer storage rate, the disk sets the pace
            "convert_write_MBps_1_worker": median("convert_bps_1") / 1e6,
            "convert_write_MBps_2_workers": median("convert_bps_2") / 1e6,
            "storage_limit_slices_per_s": storage_bps / shard_bytes_per_slice,
            "source_bytes": info["bytes"],
            "decode_limit_slices_per_s": limit,
            "naive_slices_per_s": naive,
            "slices_per_s_per_worker": per_worker,
            "slices_per_s_2_workers": two,
            "ratio_to_limit": median("ratio"),
            "scaling_1_to_2": median("scaling"),
            "ratio_to_limit_per_round": [x["ratio"] for x in rounds],
            "scaling_1_to_2_per_round": [x["scaling"] for x in rounds],
            "shard_bytes_per_source_byte": runs[1]["bytes"] / info["bytes"],
            "cluster_start_stop_s": statistics.median(x["runs"][1]["start_stop_s"] for x in rounds),
            "phase_seconds_1_worker": median_phases(1),
            "phase_seconds_2_workers": median_phases(2),
        }
        # 100 M slices on 512 single-threaded workers, at this machine's per-worker rate and perfect scaling
        # (storage must then deliver 512 x per-worker x bytes/slice)
        bytes_per_slice = info["bytes"] / slices
        figures["projection_100M_512_workers_hours"] = 100e6 / (per_worker * 512) / 3600
        figures["projection_read_GBps"] = per_worker * 512 * bytes_per_slice / 1e9
        rows = [
            {"what": "(b) decode limit: dcmread + pixel_array", "slices/s": limit, "vs limit": 1.0},
            {"what": "(a) naive: dcmread + pixel_array + np.save", "slices/s": naive, "vs limit": naive / limit},
            {"what": f"storage: {storage_bps / 1e6:,.0f} MB/s durable writes", "slices/s":
             figures["storage_limit_slices_per_s"], "vs limit": figures["storage_limit_slices_per_s"] / limit},
            {"what": f"storage, 2 writers: {figures['storage_write_MBps_2_writers']:,.0f} MB/s", "slices/s":
             figures["storage_write_MBps_2_writers"] * 1e6 / shard_bytes_per_slice,
             "vs limit": figures["storage_write_MBps_2_writers"] * 1e6 / shard_bytes_per_slice / limit},
            {"what": "(c) ingest, 1 worker", "slices/s": per_worker, "vs limit": per_worker / limit},
            {"what": "(c) ingest, 2 workers", "slices/s": two, "vs limit": two / limit},
        ]
        print_table(f"ingest benchmark ({args.syntax}): {slices:,} slices, {info['bytes'] / 1e9:.2f} GB, serial rates are one "
                    f"core; medians of {args.repeat} round(s)",
                    rows, ["what", "slices/s", "vs limit"])
        print(f"\nratio_to_limit {figures['ratio_to_limit']:.3f} (target >= 1.0)   "
              f"scaling_1_to_2 {figures['scaling_1_to_2']:.3f} (target >= 1.8)   "
              f"shard bytes / source byte {figures['shard_bytes_per_source_byte']:.3f}")
        for workers in (1, 2):
            phases = figures[f"phase_seconds_{workers}_worker{'s' if workers > 1 else ''}"]
            print(f"phases, {workers} worker(s), medians (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
        print(f"while converting, the shards were written at {figures['convert_write_MBps_1_worker']:,.0f} MB/s "
              f"(1 worker) and {figures['convert_write_MBps_2_workers']:,.0f} MB/s (2 workers): "
              f"{figures['convert_write_MBps_2_workers'] / figures['storage_write_MBps_2_writers']:.0%} of what two "
              f"writers get from this storage" + (" (storage-bound: the disk, not ingestion, sets the 2-worker figure)"
                                                   if figures['convert_write_MBps_2_workers'] >= 0.85 * figures['storage_write_MBps_2_writers'] else ""))
        print(f"cluster start + shutdown {figures['cluster_start_stop_s']:.1f} s (not counted)")
        print(f"projection: 100 M slices on 512 workers at this per-worker rate: "
              f"{figures['projection_100M_512_workers_hours']:.1f} h, needing "
              f"{figures['projection_read_GBps']:.1f} GB/s of storage reads (and about as much written)")
        write_json(args.json, "ingest", figures, {"quick": args.quick, "slices": slices, "shard_size": shard_size,
                                                 "syntax": args.syntax, "repeat": args.repeat,
                                                 "out": str(args.out) if args.out else "work folder",
                                                 "pinned": not args.no_pin})
        return figures
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
