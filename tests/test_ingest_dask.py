"""Failure behaviour on real processes: a real `dask scheduler` + two `dask worker`s with one killed
mid-job, and a client killed mid-job then rerun. No slice may be lost or duplicated, and the resumed
dataset must equal a clean run (same keys, same shard assignment, same bytes)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _ingest_fixtures import PY, REPO, SALT, all_files, cli, manifest_rows

DASK = str(Path(sys.executable).parent / "dask")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "MEDSWAV_SALT": SALT}


def _expected_keys(files):
    import pydicom
    from shards import sample_key

    keys = set()
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            continue
        keys.update(sample_key(ds.SOPInstanceUID, i, SALT) for i in range(int(ds.get("NumberOfFrames") or 1)))
    return keys


def _committed(root: Path) -> int:
    return len(list((root / "manifest").rglob("*.parquet"))) if (root / "manifest").is_dir() else 0


def _planned(root: Path) -> int:
    meta = root / "plan" / "g000.json"
    return len(json.loads(meta.read_text())["shards"]) if meta.exists() else 0


def _wait(predicate, timeout: float, what: str, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"process ended before {what}: rc={proc.returncode}\n{out[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.mark.slow
def test_killed_worker_loses_and_duplicates_nothing(tmp_path, dicom_dir):
    sources = [dicom_dir / "mr_mprage_sagittal_192", dicom_dir / "ct_kits_abdomen_18"]
    sched_file = tmp_path / "scheduler.json"
    procs = []
    try:
        procs.append(subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(sched_file)], env=ENV, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(sched_file.exists, 60, "the scheduler file")
        for _ in range(2):
            procs.append(subprocess.Popen(
                [DASK, "worker", "--scheduler-file", str(sched_file), "--nthreads", "1", "--nworkers", "1",
                 "--host", "127.0.0.1", "--no-dashboard"], env=ENV, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = json.loads(sched_file.read_text())["address"]
        out = tmp_path / "ds"
        job = subprocess.Popen([PY, "-m", "ingest", *map(str, sources), "--out", str(out), "--scheduler", address,
                                "--shard-size", "600KB", "--no-progress"], cwd=REPO, env=ENV,
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(job)
        _wait(lambda: _committed(out) >= 2, 240, "the first committed shards", job)
        assert _committed(out) < _planned(out), "job finished before the worker could be killed"
        _kill_group(procs[1])  # one worker (its nanny and process) gone for good, mid-job
        stdout, _ = job.communicate(timeout=300)
        assert job.returncode == 0, stdout[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_group(p)
    rows = manifest_rows(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 192 + 18
    assert set(keys) == _expected_keys(all_files([str(s) for s in sources]))
    assert _committed(out) == _planned(out)
    verify = subprocess.run([PY, "-m", "shards", "verify", str(out)], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.slow
def test_killed_client_then_rerun_equals_clean_run(tmp_path, dicom_dir):
    sources = [str(dicom_dir / "mr_mprage_sagittal_192"), str(dicom_dir / "mr_transfer_syntaxes")]
    args = ["--workers", "1", "--shard-size", "600KB", "--no-progress", "--dashboard-address", ":0"]
    clean = tmp_path / "clean"
    done = cli(*sources, "--out", clean, *args, env_extra={"MEDSWAV_SALT": SALT})
    assert done.returncode == 0, done.stderr[-3000:]

    resumed = tmp_path / "resumed"
    job = subprocess.Popen([PY, "-m", "ingest", *sources, "--out", str(resumed), *args], cwd=REPO, env=ENV,
                           start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(lambda: _committed(resumed) >= 3, 240, "a few committed shards", job)
    finally:
        _kill_group(job)  # the client and its local workers die mid-job
    assert 0 < _committed(resumed) < _planned(resumed), "the job was not interrupted mid-way"
    again = cli(*sources, "--out", resumed, *args, env_extra={"MEDSWAV_SALT": SALT})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming generation g000" in again.stderr

    def layout(root):
        return sorted((r["key"], r["shard"], r["index"], r["npy_crc32"], r["json_crc32"]) for r in manifest_rows(root))

    assert layout(resumed) == layout(clean)
    assert len(layout(clean)) == 192 + 9
    verify = subprocess.run([PY, "-m", "shards", "verify", str(resumed)], cwd=REPO, env=ENV, capture_output=True,
                            text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    leftovers = [p for p in resumed.rglob(".*tmp-*")]
    assert not leftovers
