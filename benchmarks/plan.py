"""Planning at scale: client memory and worker scaling of `ingest.plan.plan_generation`.

`python -m benchmarks.plan --rows N [--quick] [--json PATH]`

Method: a synthetic inventory of N rows with the scan's exact schema (ingest.scan.INVENTORY_SCHEMA) is
written in parts of --part-rows rows, as scan tasks would write it (streamed: the generator never holds
more than one part). Its shape: patients with 1-3 studies of 1-4 series; series of CT (512 x 512) and
MR (256 x 256) of about 150 slices, XR (1-2 images of 2500 x 2000) and US (1-6 multi-frame files of
20-80 frames); 1 % of the files are second copies of a SOP instance (another path, half of them
lossy); every row carries a native_layout JSON of the real size (~650 characters, per-file keys).
Then, for 1 and for 2 workers, a fresh client process starts an embedded LocalCluster, runs the
planning of generation 0 and the finalize step, and reports its wall time, its own peak RSS (client
and scheduler, VmHWM: everything it gathered from the workers included) and each worker's peak RSS
(VmHWM read in the worker at the end), and the CPU seconds the workers spent (on a loaded machine the
wall-time scaling says little; the CPU time says what the work costs). The planned slice count is checked against the
generator's own count of unique (SOP, frame) pairs.

Then the control plane's other two lines, each a fresh process: `shards verify` shards/s with 1 and 2
workers (benchmarks.verify) and a training rank's start-up, seconds to its first batch with 10,000 shards
(benchmarks.startup; 1,000 with --quick); `--no-verify` / `--no-startup` skip them.

Finalize here writes dataset.json over a dataset without shards (no convert ran): its figure is the
fixed cost only; finalize's per-shard work (summarize over the manifests) is not exercised.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._common import parser, print_table, write_json

SALT = "benchmark-plan-salt"
HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
LAYOUT = ('{{"start":{start},"frame_bytes":{fb},"size":{size},"mtime_ns":{mtime},"rows":{r},"cols":{c},"spp":{spp},'
          '"planar":0,"dtype":"{dtype}","shift":4,"keys":["{key}"],"meta":{{"photometric":"{phot}",'
          '"rule_bits_stored":12,"signed":false,"slope":1.0,"intercept":{icpt},"modality_lut_sequence":false,'
          '"pixel_spacing":[0.859375,0.859375],"slice_thickness":0.90000003576279,"window_center":{wc}.0,'
          '"window_width":{ww}.0,"bits_stored":12,"bits_allocated":{bits},"pixel_representation":0,'
          '"transfer_syntax":"1.2.840.10008.1.2.1","body_part":"ABDOMEN","manufacturer":"SIEMENS"}}}}')
# modality: (share of series, rows, cols, spp, bits, photometric, files per series (lo, hi), frames (lo, hi))
KINDS = {
    "CT": (0.45, 512, 512, 1, 16, "MONOCHROME2", (100, 200), (1, 1)),
    "MR": (0.40, 256, 256, 1, 16, "MONOCHROME2", (100, 200), (1, 1)),
    "DX": (0.10, 2500, 2000, 1, 16, "MONOCHROME1", (1, 2), (1, 1)),
    "US": (0.05, 600, 800, 3, 8, "RGB", (1, 6), (20, 80)),
}


def _hashes(rng: np.random.Generator, n: int, digits: int = 32) -> np.ndarray:
    raw = np.frombuffer(rng.bytes(n * digits // 2), np.uint8)
    chars = np.empty(n * digits, np.uint8)
    chars[0::2], chars[1::2] = HEX[raw >> 4], HEX[raw & 15]
    return chars.view(f"S{digits}")


def synth_part(rng: np.random.Generator, target: int, part: int) -> tuple[dict, int]:
    """One inventory part of about `target` rows (whole patients); returns (columns, unique slices)."""
    kinds = list(KINDS)
    shares = np.array([KINDS[k][0] for k in kinds])
    series: list[tuple[int, int, int, int]] = []  # (kind, files, frames per file, patient, study)
    patient = study = 0
    rows = 0
    while rows < target:
        for _ in range(rng.integers(1, 4)):
            for _ in range(rng.integers(1, 5)):
                k = rng.choice(len(kinds), p=shares)
                lo, hi = KINDS[kinds[k]][6]
                flo, fhi = KINDS[kinds[k]][7]
                files = int(rng.integers(lo, hi + 1))
                series.append((k, files, int(rng.integers(flo, fhi + 1)), patient, study))
                rows += files
            study += 1
        patient += 1
    kind = np.repeat([s[0] for s in series], [s[1] for s in series])
    frames = np.repeat([s[2] for s in series], [s[1] for s in series]).astype(np.int32)
    series_i = np.repeat(np.arange(len(series)), [s[1] for s in series])
    study_i = np.array([s[4] for s in series])[series_i]
    patient_i = np.array([s[3] for s in series])[series_i]
    n = len(kind)
    series_h, study_h, patient_h = _hashes(rng, len(series)), _hashes(rng, study + 1), _hashes(rng, patient + 1)
    sop = _hashes(rng, n)
    unique_slices = int(frames.sum())
    # 1 % second copies of a SOP instance: same SOP, other file
    copies = rng.choice(n, size=max(0, n // 100), replace=False)
    take = np.concatenate([np.arange(n), copies])
    copy = np.zeros(len(take), bool)
    copy[n:] = True
    kind, frames, series_i, study_i, patient_i, sop = (kind[take], frames[take], series_i[take], study_i[take],
                                                       patient_i[take], sop[take])
    m = len(take)
    r = np.array([KINDS[k][1] for k in kinds])[kind]
    c = np.array([KINDS[k][2] for k in kinds])[kind]
    spp = np.array([KINDS[k][3] for k in kinds])[kind]
    bits = np.array([KINDS[k][4] for k in kinds])[kind]
    declared = r.astype(np.int64) * c * frames * spp * bits // 8
    lossy = copy & (rng.random(m) < 0.5)
    source_hash = _hashes(rng, m)
    keys = _hashes(rng, m, 24)
    codes = np.array(kinds)[kind]
    phot = np.array([KINDS[k][5] for k in kinds])[kind]
    sources = [f"/archive/site{part % 7}/{'copies/' if cp else ''}p{pi:07d}/st{si:06d}/se{se:07d}/IM{i:06d}.dcm"
               for i, (cp, pi, si, se) in enumerate(zip(copy.tolist(), patient_i.tolist(), study_i.tolist(),
                                                        series_i.tolist()))]
    start = 1500 + (rng.integers(0, 200, m) * 4)
    layouts = [LAYOUT.format(start=s, fb=fb, size=s + d, mtime=1796051071687460952 + i, r=rr, c=cc, spp=sp,
                             dtype="<u2" if b == 16 else "|u1", key=k.decode(), phot=ph, icpt=-1024 if code == "CT" else 0,
                             wc=40 + i % 50, ww=400 + i % 80, bits=b)
               if not ls and sp == 1 else None
               for i, (s, fb, d, rr, cc, sp, b, k, ph, code, ls) in enumerate(zip(
                   start.tolist(), (declared // frames).tolist(), declared.tolist(), r.tolist(), c.tolist(),
                   spp.tolist(), bits.tolist(), keys, phot.tolist(), codes.tolist(), lossy.tolist()))]
    columns = {
        "source": sources, "source_hash": source_hash.astype(str), "size": start + declared,
        "sop_hash": sop.astype(str), "series_hash": series_h[series_i].astype(str),
        "study_hash": study_h[study_i].astype(str), "patient_hash": patient_h[patient_i].astype(str),
        "modality_code": codes, "sop_class_uid": np.where(codes == "CT", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"),
        "rows": r.astype(np.int32), "cols": c.astype(np.int32), "frames": frames,
        "samples_per_pixel": spp.astype(np.int32), "bits_allocated": bits.astype(np.int32),
        "bits_stored": np.where(bits == 16, 12, 8).astype(np.int32), "pixel_representation": np.zeros(m, np.int32),
        "photometric": phot, "transfer_syntax": np.where(lossy, "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"),
        "lossy": lossy, "has_pixels": np.ones(m, bool), "float_pixels": np.zeros(m, bool),
        "pixel_length": np.where(lossy, -1, declared), "pixel_end": np.where(lossy, -1, start + declared),
        "declared_bytes": declared, "native_layout": layouts,
    }
    return columns, unique_slices


def synthesize(root: Path, rows: int, part_rows: int, seed: int = 0) -> tuple[int, int]:
    """Inventory parts of generation 0 under root/inventory; returns (rows written, unique slices)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ingest.scan import INVENTORY_SCHEMA
    from shards.layout import INVENTORY_DIR

    (root / INVENTORY_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = slices = part = 0
    while written < rows:
        columns, unique = synth_part(rng, min(part_rows, rows - written), part)
        table = pa.table({f.name: pa.array(columns[f.name], f.type) for f in INVENTORY_SCHEMA}, schema=INVENTORY_SCHEMA)
        pq.write_table(table, root / INVENTORY_DIR / f"part-g000-{part:05d}-000.parquet")
        written += table.num_rows
        slices += unique
        part += 1
    return written, slices


_CLIENT = r"""
import json, sys, time
from pathlib import Path
import dask
from distributed import Client, LocalCluster
from ingest import plan as planning
from ingest.finalize import finalize

def cpu():
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def peak_kb():
    # VmHWM: the peak RSS of this process image (ru_maxrss would carry over the forking parent's peak
    # across exec, on Linux)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

root, workers, rows = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dask.config.set({"distributed.scheduler.work-stealing": False, "distributed.worker.profile.enabled": False})
with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                  silence_logs=40) as cluster, Client(cluster) as client:
    client.run(lambda: __import__("ingest.plan"))
    started_kb = peak_kb()
    cpu0 = sum(client.run(cpu).values())
    start = time.perf_counter()
    plan = planning.plan_generation(client, root, 0, rows=rows, modality_map={}, max_pixel_bytes=2 * 2**30,
                                    max_side=None, shard_size=1_000_000_000, frames_per_unit=16,
                                    val_fraction=0.05, seed=0, salt="benchmark-plan-salt", hash_paths=False,
                                    labels_path=None)
    planning.write_plan_meta(root, 0, {"generation": 0, "status": "pending", "shards": plan.shards,
                                        "slices": plan.slices})
    plan_s = time.perf_counter() - start
    worker_cpu = sum(client.run(cpu).values()) - cpu0
    planned_kb = peak_kb()
    start = time.perf_counter()
    finalize(root, {"generations": [0]})
    finalize_s = time.perf_counter() - start
    worker_kb = client.run(peak_kb)
print(json.dumps({"plan_s": plan_s, "finalize_s": finalize_s, "slices": plan.slices, "shards": len(plan.shards),
                  "already": plan.already_ingested, "rejected": plan.rejected, "phases": plan.phase_seconds,
                  "client_kb": peak_kb(), "client_started_kb": started_kb, "client_planned_kb": planned_kb,
                  "worker_cpu_s": worker_cpu, "worker_kb": max(worker_kb.values())}))
"""


def _reset(root: Path) -> None:
    from ingest.paths import work_dir
    from ingest.scan import WORK_DIR
    from shards.layout import DATASET_JSON, ERRORS_DIR, PLAN_DIR

    shutil.rmtree(work_dir(root), ignore_errors=True)  # planning work files live beside the dataset
    for name in (WORK_DIR, PLAN_DIR, ERRORS_DIR, DATASET_JSON):
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_client(root: Path, workers: int, rows: int) -> dict:
    _reset(root)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-c", _CLIENT, str(root), str(workers), str(rows)], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=7200)
    if out.returncode:
        raise RuntimeError(f"client with {workers} worker(s) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_benchmark(module: str, tmp: Path, quick: bool) -> dict:
    """Another benchmark of the control plane in a fresh process (its own imports and peak RSS): its figures."""
    out = tmp / f"{module}.json"
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--json", str(out)] + (["--quick"] if quick else [])
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def _other_lines(tmp: Path, args) -> dict:
    """The control plane's other two figures, so one command gives issue 13's whole table: `shards verify`
    with 1 and 2 workers (benchmarks.verify) and a rank's start-up with 10,000 shards (benchmarks.startup;
    1,000 with --quick)."""
    figures, lines = {}, []
    if not args.no_verify:
        v = _run_benchmark("verify", tmp, args.quick)
        figures.update({"verify_shards_per_s_1w": round(v["shards_per_s_1w"], 2),
                        "verify_shards_per_s_2w": round(v["shards_per_s_2w"], 2),
                        "verify_scaling_1_to_2": round(v["scaling_1_to_2"], 3)})
        lines.append(f"verify: {v['shards_per_s_1w']:.1f} shards/s with 1 worker, {v['shards_per_s_2w']:.1f} with 2: "
                     f"scaling {v['scaling_1_to_2']:.2f} (target >= 1.7)")
    if not args.no_startup:
        s = _run_benchmark("startup", tmp, args.quick)
        figures["startup_seconds"] = round(s["startup_seconds"], 3)
        figures["startup_shards"] = 1000 if args.quick else 10_000
        lines.append(f"rank start-up: {s['startup_seconds']:.2f} s to the first batch with {figures['startup_shards']:,} "
                     f"shards (target <= 2 s with 10,000)")
    if lines:
        print("\n" + "\n".join(lines), flush=True)
    return figures


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="inventory rows (files) to synthesise")
    p.add_argument("--part-rows", type=int, default=50_000, help="rows per inventory part (one scan task's)")
    p.add_argument("--dir", help="work folder (default: a temporary folder, removed at the end)")
    p.add_argument("--no-verify", action="store_true", help="skip the `shards verify` line (benchmarks.verify)")
    p.add_argument("--no-startup", action="store_true", help="skip the rank start-up line (benchmarks.startup)")
    args = p.parse_args(argv)
    rows = 50_000 if args.quick else args.rows
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="medswav-plan-bench-"))
    root = tmp / "dataset"
    try:
        start = time.perf_counter()
        written, unique = synthesize(root, rows, args.part_rows)
        synth_s = time.perf_counter() - start
        print(f"synthetic inventory: {written:,} rows, {unique:,} unique slices, {synth_s:.1f} s", flush=True)
        results = {}
        for workers in (1, 2):
            r = run_client(root, workers, written)
            if r["slices"] != unique:
                raise RuntimeError(f"planned {r['slices']:,} slices, the inventory holds {unique:,}")
            results[workers] = r
            print(f"{workers} worker(s): plan phases (s) {json.dumps({k: round(v, 2) for k, v in r['phases'].items()})}; "
                  f"workers' CPU {r['worker_cpu_s']:.1f} s; client peak RSS after cluster start "
                  f"{r['client_started_kb'] / 1024:.0f} MB, after plan {r['client_planned_kb'] / 1024:.0f} MB, "
                  f"after finalize {r['client_kb'] / 1024:.0f} MB", flush=True)
        table = [{"workers": w, "plan s": r["plan_s"], "finalize s": r["finalize_s"], "shards": r["shards"],
                  "slices": r["slices"], "client peak MB": r["client_kb"] / 1024, "worker peak MB": r["worker_kb"] / 1024}
                 for w, r in results.items()]
        print_table(f"plan + finalize, {written:,} inventory rows", table, list(table[0]))
        figures = {
            "rows": written, "slices": unique, "shards": results[1]["shards"],
            "client_peak_rss_mb": round(max(r["client_kb"] for r in results.values()) / 1024, 1),
            "worker_peak_rss_mb": round(max(r["worker_kb"] for r in results.values()) / 1024, 1),
            "plan_seconds_1w": round(results[1]["plan_s"], 2), "plan_seconds_2w": round(results[2]["plan_s"], 2),
            "scaling_1_to_2": round(results[1]["plan_s"] / results[2]["plan_s"], 3),
            "finalize_seconds_1w": round(results[1]["finalize_s"], 3),
            "client_peak_rss_after_plan_mb": round(max(r["client_planned_kb"] for r in results.values()) / 1024, 1),
            "worker_cpu_seconds_1w": round(results[1]["worker_cpu_s"], 1),
            "worker_cpu_seconds_2w": round(results[2]["worker_cpu_s"], 1),
        }
        figures.update(_other_lines(tmp, args))
        print(json.dumps(figures))
        write_json(args.json, "plan", figures, {"rows": rows, "part_rows": args.part_rows, "quick": args.quick,
                                                "cores": os.cpu_count()})
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
