"""Job-level safety of ingest on real files: one writer per dataset, nothing lost when a manifest part
disappears, clear refusals before anything is created, a full disk reported as such."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from _ingest_fixtures import PY, REPO, SALT, cli, error_rows, manifest_rows, run_ingest

RUN_ARGS = ("--workers", "1", "--no-progress", "--dashboard-address", ":0")


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _write_lock(root: Path, **fields) -> Path:
    from ingest.lock import lock_path

    now = time.time()
    info = {"pid": 1, "host": "some-other-host", "user": "someone", "token": "f" * 32, "started": "earlier",
            "heartbeat_unix": now, **fields}
    path = lock_path(root)
    path.write_text(json.dumps(info))
    return path


def _ingest_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ingest:")]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs folder (needs root; skipped where mounting is not allowed)."""
    mounted = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                           text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


# ---------------------------------------------------------------- item 1: one writer per dataset

def test_second_writer_is_refused_with_status_2(tmp_path, dicom_dir):
    from ingest.lock import DatasetLock

    out = tmp_path / "ds"
    out.mkdir()
    with DatasetLock(out) as held:  # a live job of this host holds the dataset
        r = cli(dicom_dir / "ct_kits_abdomen_18", "--out", out, *RUN_ARGS, env_extra={"MEDSWAV_SALT": SALT},
                timeout=120)
        assert r.returncode == 2, r.stderr[-3000:]
        lines = _ingest_lines(r.stderr)
        assert len(lines) == 1 and "is locked by another ingest job" in lines[0], r.stderr[-3000:]
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in lines[0]
        assert sorted(p.name for p in out.iterdir()) == ["ingest.lock"]  # nothing written by the refused job
        assert json.loads((out / "ingest.lock").read_text())["token"] == held.token
    assert not (out / "ingest.lock").exists()  # released


def test_stale_locks_are_taken_over_and_live_ones_kept(tmp_path):
    from ingest.lock import DatasetLock, DatasetLocked, LockLost, lock_path, pid_scope

    root = tmp_path / "ds"
    root.mkdir()
    _write_lock(root, heartbeat_unix=time.time() - 3600)  # another host, silent for an hour
    with DatasetLock(root, timeout=600) as lock:
        assert "no heartbeat for" in lock.took_over["reason"]
        assert json.loads(lock_path(root).read_text())["pid"] == os.getpid()
    assert not lock_path(root).exists()

    # this host, fresh heartbeat, but its process is gone ...
    _write_lock(root, host=socket.gethostname(), pid=_dead_pid(), pid_scope=pid_scope())
    with DatasetLock(root) as lock:
        assert "on this host is gone" in lock.took_over["reason"]
    # ... unless that pid belongs to another PID namespace (a container with the same host name)
    _write_lock(root, host=socket.gethostname(), pid=_dead_pid(), pid_scope="another-boot:1")
    with pytest.raises(DatasetLocked):
        DatasetLock(root).acquire()

    _write_lock(root)  # another host, fresh heartbeat: it may be running
    with pytest.raises(DatasetLocked, match="pid 1 on host some-other-host"):
        DatasetLock(root).acquire()
    lock_path(root).write_text("{")  # a holder that died while writing its lock: judged by the file's age
    with pytest.raises(DatasetLocked):
        DatasetLock(root).acquire()
    old = time.time() - 3600
    os.utime(lock_path(root), (old, old))
    with DatasetLock(root) as lock:
        assert lock.took_over["reason"].startswith("no heartbeat")

    with pytest.raises(RuntimeError, match="inside"):  # released when the job raises
        with DatasetLock(root):
            raise RuntimeError("inside")
    assert not lock_path(root).exists()

    lock = DatasetLock(root, heartbeat=0.05).acquire()  # the heartbeat keeps the file fresh ...
    try:
        first = json.loads(lock_path(root).read_text())["heartbeat_unix"]
        deadline = time.time() + 30
        while json.loads(lock_path(root).read_text() or "{}").get("heartbeat_unix", first) == first:
            assert time.time() < deadline, "heartbeat never refreshed"
            time.sleep(0.05)
        deadline = time.time() + 30
        while True:  # ... and notices when another job has taken the lock over
            if json.loads(lock_path(root).read_text() or "{}").get("token") != "f" * 32:
                _write_lock(root)  # (again, if a beat running at that moment wrote over it)
            try:
                lock.check()
            except LockLost:
                break
            assert time.time() < deadline, "lost lock not noticed"
            time.sleep(0.05)
    finally:
        lock.release()
    assert json.loads(lock_path(root).read_text())["token"] == "f" * 32  # the other job's lock stays


# ---------------------------------------------------------------- item 2: a lost manifest part

def test_lost_manifest_part_is_rewritten_never_healed_away(tmp_path, dicom_dir, capsys, monkeypatch):
    import ingest.job
    from ingest.job import JobFailed

    ct, mr = dicom_dir / "ct_kits_abdomen_18", dicom_dir / "mr_transfer_syntaxes"
    out = tmp_path / "ds"
    # hashed paths (the default): the rewrite must find its files through this run's scan and its map
    run_ingest([ct], out, shard_size="2MB")

    def ct_layout():
        return sorted((r["key"], r["shard"], r["index"], r["npy_crc32"], r["json_crc32"])
                      for r in manifest_rows(out) if r["modality"] == "ct")

    before = ct_layout()
    parts = sorted((out / "manifest" / "modality=ct").glob("*.parquet"))
    assert len(before) == 18 and len(parts) >= 3
    victim = parts[1].stem
    victim_sources = {r["source_hash"] for r in manifest_rows(out) if r["shard"] == victim}
    tar = out / "shards" / "ct" / f"{victim}.tar"
    tar_bytes = tar.read_bytes()
    parts[1].unlink()

    # a run whose sources lack the shard's files cannot redo it: it fails naming it, and dataset.json
    # keeps its count instead of shrinking to what the manifests still hold
    with pytest.raises(JobFailed, match=victim):
        run_ingest([mr], out, shard_size="2MB")
    assert json.loads((out / "dataset.json").read_text())["samples"] == 18

    # the run with the shard's sources rewrites it under its own name, identical (a dead job's lock is
    # taken over on the way)
    from ingest.lock import pid_scope

    _write_lock(out, host=socket.gethostname(), pid=_dead_pid(), pid_scope=pid_scope())
    capsys.readouterr()
    # the client reads the scan's rows of the lost shard's files only, never the whole inventory
    read_for_rewrite = []
    real_read_inventory = ingest.job._read_inventory

    def recording_read_inventory(*args, **kwargs):
        table = real_read_inventory(*args, **kwargs)
        read_for_rewrite.append(table)
        return table

    monkeypatch.setattr(ingest.job, "_read_inventory", recording_read_inventory)
    summary, stats = run_ingest([ct, mr], out, shard_size="2MB")
    monkeypatch.undo()
    assert [set(t.column("source_hash").to_pylist()) for t in read_for_rewrite] == [victim_sources]
    assert all(p for t in read_for_rewrite for p in t.column("path").to_pylist())  # each found in the map
    assert "taking over the stale dataset lock" in capsys.readouterr().err
    assert ct_layout() == before and tar.read_bytes() == tar_bytes
    assert stats.shards_written == 1 and stats.new_slices == 0
    assert summary["samples"] == 18 + 9 == len(manifest_rows(out))
    assert not (out / "ingest.lock").exists() and not (out / "_work").exists()
    verify = subprocess.run([PY, "-m", "shards", "verify", str(out)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert verify.returncode == 0, verify.stdout + verify.stderr


# ---------------------------------------------------------------- items 13 and 16: refusals, own folder

@pytest.mark.parametrize("case, message", [
    ("out is a file", "exists and is not a folder"),
    ("foreign folder", "is a non-empty folder that is not a medswav dataset"),
    ("negative seed", "--seed must be an integer >= 0"),
    ("unreachable scheduler", "cannot reach Dask scheduler"),
    ("read-only filesystem", "cannot create dataset folder"),
    ("setting of the wrong type", "invalid setting"),
])
def test_refused_with_one_line_and_status_2_creating_nothing(tmp_path, dicom_dir, tmpfs, case, message):
    base = tmpfs("ro,size=1m") if case == "read-only filesystem" else tmp_path / "base"
    base.mkdir(exist_ok=True)
    out = base / "ds"
    extra = []
    if case == "out is a file":
        out.write_text("not a dataset\n")
    elif case == "foreign folder":
        out.mkdir()
        (out / "notes.txt").write_text("someone else's file\n")
    elif case == "negative seed":
        extra = ["--seed", "-1"]
    elif case == "unreachable scheduler":
        extra = ["--scheduler", "tcp://127.0.0.1:9"]
    elif case == "setting of the wrong type":
        (tmp_path / "ingest.toml").write_text('frames_per_unit = "many"\n')
        extra = ["--config", tmp_path / "ingest.toml"]
    before = sorted((str(p), p.stat().st_size) for p in base.rglob("*"))
    args = [dicom_dir / "ct_kits_abdomen_18", "--out", out, "--no-progress", *extra]
    if case != "unreachable scheduler":
        args += ["--workers", "1", "--dashboard-address", ":0"]
    r = cli(*args, env_extra={"MEDSWAV_SALT": ""}, timeout=120)  # no salt given: a salt file would be created
    assert r.returncode == 2, r.stderr[-3000:]
    lines = _ingest_lines(r.stderr)
    assert len(lines) == 1 and message in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert sorted((str(p), p.stat().st_size) for p in base.rglob("*")) == before  # no folder, salt or lock


def test_dataset_inside_a_source_tree_is_not_scanned(tmp_path, dicom_dir):
    src = tmp_path / "export"
    (src / "study").mkdir(parents=True)
    files = sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))[:4]
    for f in files:
        (src / "study" / f.name).symlink_to(f)
    out = src / "medswav"  # exists (ingest.json, lock, inventory parts being written) when the scan walks
    summary, stats = run_ingest([src], out)
    assert stats.files == 4, stats
    assert summary["samples"] == 4 and not error_rows(out)
    from ingest.paths import read_map

    assert set(read_map(out).column("path").to_pylist()) == {str(src / "study" / f.name) for f in files}


def test_unreadable_folder_near_the_top_becomes_an_error_row(tmp_path, dicom_dir, monkeypatch):
    """Root reads every folder whatever its mode, so the refusal is simulated where the scan lists it."""
    import pyarrow.parquet as pq

    from ingest.plan import merge_scan_errors
    from ingest.scan import run_scan_task, scan_tasks

    src = tmp_path / "export"
    files = sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))[:4]
    for sub, chosen in (("readable", files[:3]), ("locked", files[3:])):
        (src / sub).mkdir(parents=True)
        for f in chosen:
            (src / sub / f.name).symlink_to(f)
    locked = os.path.normpath(src / "locked")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.normpath(os.fspath(path)) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    tasks = scan_tasks([str(src)], target_tasks=16, files_per_task=100)  # the client lists the top levels
    out = tmp_path / "ds"
    results = [run_scan_task(t, root=str(out), generation=0, salt=SALT, hash_paths=False) for t in tasks]
    assert sum(r["errors"] for r in results) == 1
    assert merge_scan_errors(0, root=str(out), generation=0, buckets=1) == 1  # as the job does on a worker
    errors = pq.read_table(out / "errors" / "scan-g000-b000000.parquet").to_pylist()
    assert [(e["source"], e["stage"], e["reason"]) for e in errors] == [(locked, "scan", "unreadable folder")]
    assert "Permission denied" in errors[0]["detail"]
    scanned = pads.dataset(out / "inventory", format="parquet").to_table().column("source").to_pylist()
    assert sorted(scanned) == sorted(str(src / "readable" / f.name) for f in files[:3])


# ---------------------------------------------------------------- item 14: disk full

@pytest.mark.parametrize("direct_io", [True, False])
def test_disk_full_while_writing_a_shard_raises_enospc(tmp_path, dicom_dir, monkeypatch, direct_io):
    """Injected ENOSPC after 1 MB: the writer raises it (not a BufferError from its cleanup), leaves no
    temporary, and the same shard is then written whole."""
    import pydicom

    import shards.shardfile as shardfile
    from shards import SampleMeta, ShardWriter
    from shards.reader import iter_samples

    pixels = [pydicom.dcmread(f).pixel_array for f in sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))[:6]]
    real_pwrite = os.pwrite
    written = [0]

    def pwrite(fd, data, offset):
        if written[0] + len(data) > 1 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_pwrite(fd, data, offset)
        written[0] += n
        return n

    def write_shard(root):
        w = ShardWriter(root, modality="ct", name="ct-g000-000000", direct_io=direct_io)
        try:
            for i, p in enumerate(pixels):
                meta = SampleMeta(modality="ct", split="train", frame=0, frames=1, sop_hash=f"{i:032x}",
                                  series_hash="a" * 32, study_hash="b" * 32, patient_hash="c" * 32,
                                  source_hash=f"{i:032x}")
                w.write(f"{i:024x}", p, meta)
            return w.commit()
        except BaseException:
            w.abort()
            raise

    monkeypatch.setattr(shardfile.os, "pwrite", pwrite)
    with pytest.raises(OSError) as caught:
        write_shard(tmp_path)
    assert caught.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []
    monkeypatch.setattr(shardfile.os, "pwrite", real_pwrite)  # space freed
    assert write_shard(tmp_path) == 6
    stored = [s[1] for s in iter_samples(tmp_path)]
    assert len(stored) == 6 and all(np.array_equal(a, b) for a, b in zip(stored, pixels))


def test_disk_full_reaches_the_user_and_a_rerun_completes(tmp_path, dicom_dir, tmpfs):
    disk = tmpfs("size=3m")  # 18 CT slices need 9.5 MB
    out = disk / "ds"
    args = [dicom_dir / "ct_kits_abdomen_18", "--out", out, "--shard-size", "1MB", *RUN_ARGS]
    full = cli(*args, env_extra={"MEDSWAV_SALT": SALT})
    assert full.returncode == 1, full.stderr[-3000:]
    lines = _ingest_lines(full.stderr)  # (the workers' own logs show the failed tasks' tracebacks)
    assert len(lines) == 1 and "No space left on device" in lines[0], full.stderr[-3000:]
    assert "BufferError" not in full.stderr and "Traceback (most recent call last)" not in full.stderr
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
    again = cli(*args, env_extra={"MEDSWAV_SALT": SALT})
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(manifest_rows(out)) == 18
    verify = subprocess.run([PY, "-m", "shards", "verify", str(out)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert verify.returncode == 0 and "temporary" not in verify.stdout, verify.stdout + verify.stderr
