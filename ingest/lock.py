"""One writer per dataset: the lock file `DATASET/ingest.lock`.

Two ingest jobs writing the same dataset at once overwrite each other's plans and lose or duplicate
slices, so every job holds this lock from before its first write to its end. It must work where the
dataset usually lives, on a shared file system seen by several hosts, so it is not an flock (not
reliable over NFS) but a file created with O_CREAT|O_EXCL (atomic on local file systems and NFS v3+).
It holds JSON: pid, host, user, start time and a heartbeat time that a background thread of the holder
rewrites every `heartbeat` seconds (a tenth of the timeout, at most a minute). Host and user names
are the operator's, not patient data.

A lock is stale, and the next job takes it over, when its holder ran on this host, in this boot and PID
namespace (containers sharing a host name have their own PIDs), and that process is gone, or when its
heartbeat is older than the timeout (`lock_timeout`, 600 s by default; hosts' clocks
must agree to well within it). Takeover renames the stale file away (one rename succeeds, the others
find it gone) and then creates a fresh one with O_EXCL as usual; a takeover that finds it moved a lock
which was refreshed in the meantime puts it back. The holder's heartbeat checks that the file is still
its own, so a job whose lock was taken over (its host stalled for longer than the timeout) stops at
its next check instead of writing on.
"""
from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from .config import ConfigError

LOCK_FILE = "ingest.lock"
DEFAULT_TIMEOUT = 600.0
_MAX_HEARTBEAT = 60.0
_ATTEMPTS = 20


class DatasetLocked(ConfigError):
    """Another ingest job holds the dataset (exit status 2: the job could not run)."""


class LockLost(RuntimeError):
    """This job's lock was taken over by another job (its heartbeat stalled past the timeout)."""


def lock_path(root: Path) -> Path:
    return Path(root) / LOCK_FILE


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers): the uid says as much
        return str(os.getuid())


def pid_scope() -> str | None:
    """Where a pid means the same process: this boot and this PID namespace (None when unknown)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class DatasetLock:
    """Exclusive writer lock of a dataset folder (which must exist). Use as a context manager:
    acquired on entry (DatasetLocked when another live job holds it), released on exit, exceptions
    included."""

    def __init__(self, root: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT, heartbeat: float | None = None):
        self.root = Path(root)
        self.path = lock_path(self.root)
        self.timeout = float(timeout)
        self.heartbeat = heartbeat if heartbeat is not None else min(_MAX_HEARTBEAT, max(1.0, self.timeout / 10))
        self.token = uuid.uuid4().hex
        self.took_over: dict | None = None  # the stale holder this lock replaced, if any
        self._info: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False

    # ------------------------------------------------------------ acquire / release
    def acquire(self) -> "DatasetLock":
        started = _now()
        self._info = {"pid": os.getpid(), "pid_scope": pid_scope(), "host": socket.gethostname(), "user": _user(),
                      "token": self.token,
                      "started": _iso(started), "heartbeat": _iso(started), "heartbeat_unix": started,
                      "timeout_s": self.timeout}
        for _ in range(_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            except OSError as e:
                raise ConfigError(f"cannot write to dataset folder {self.root}: {e.strerror or e}") from None
            try:
                os.write(fd, self._payload())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._thread = threading.Thread(target=self._beat, name="ingest-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise DatasetLocked(f"could not take the lock {self.path}: other jobs keep taking it over")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        raw = self._read_raw()
        if raw is not None and self._token_of(raw) == self.token:
            self.path.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise LockLost when another job has taken this lock over."""
        if self._lost:
            raise LockLost(f"the dataset lock {self.path} was taken over by another job (this job's heartbeat "
                           f"stalled for more than {self.timeout:.0f} s); stopping before writing more")

    def __enter__(self) -> "DatasetLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------ the lock file
    def _payload(self) -> bytes:
        return (json.dumps(self._info, sort_keys=True) + "\n").encode()

    def _read_raw(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    @staticmethod
    def _parse(raw: bytes) -> dict | None:
        try:
            info = json.loads(raw)
        except ValueError:
            return None  # being written (or written by a job that died right after creating it)
        return info if isinstance(info, dict) else None

    def _token_of(self, raw: bytes) -> str | None:
        info = self._parse(raw)
        return info.get("token") if info else None

    def _stale_reason(self, raw: bytes) -> str | None:
        """Why the lock in `raw` is stale, or None when its holder may still be alive."""
        info = self._parse(raw)
        if info is None:
            try:
                beat = self.path.stat().st_mtime  # unreadable content: the file's age stands in
            except FileNotFoundError:
                return "gone"
        else:
            scope = pid_scope()
            if info.get("host") == socket.gethostname() and scope is not None and info.get("pid_scope") == scope \
                    and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
                return f"process {info['pid']} on this host is gone"
            beat = float(info.get("heartbeat_unix", 0))
        age = _now() - beat
        if age > self.timeout:
            return f"no heartbeat for {age:.0f} s (timeout {self.timeout:.0f} s)"
        return None

    def _holder(self, raw: bytes) -> str:
        info = self._parse(raw)
        if info is None:
            return "another ingest job (lock file being written)"
        age = _now() - float(info.get("heartbeat_unix", 0))
        return (f"another ingest job (pid {info.get('pid')} on host {info.get('host')}, user {info.get('user')}, "
                f"since {info.get('started')}, last heartbeat {age:.0f} s ago)")

    def _handle_existing(self) -> None:
        raw = self._read_raw()
        if raw is None:
            return  # released meanwhile: try to create it again
        reason = self._stale_reason(raw)
        if reason is None:
            raise DatasetLocked(
                f"dataset {self.root} is locked by {self._holder(raw)}; wait for it to finish (a lock whose "
                f"heartbeat is older than {self.timeout:.0f} s, or whose process on this host is gone, is taken "
                f"over automatically; remove {self.path} only if you know that job is dead)")
        moved = self.path.with_name(f".{LOCK_FILE}.stale-{self.token[:12]}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # another job renamed it first: race for the O_EXCL create
        try:
            if moved.read_bytes() != raw:
                # between our read and our rename, the lock was refreshed or replaced by a live job: give it back
                try:
                    os.link(moved, self.path)
                except FileExistsError:
                    pass  # a third job created one already; that one holds the dataset now
                return
            self.took_over = {**(self._parse(raw) or {}), "reason": reason}
            print(f"ingest: taking over the stale dataset lock of {self._holder(raw)}: {reason}", file=sys.stderr,
                  flush=True)
        finally:
            moved.unlink(missing_ok=True)

    # ------------------------------------------------------------ heartbeat
    def _beat(self) -> None:
        misses = 0
        while not self._stop.wait(self.heartbeat):
            raw = self._read_raw()
            if raw is None or self._token_of(raw) != self.token:
                misses += 1  # one miss may be a takeover that is putting our file back
                if misses >= 2:
                    self._lost = True
                    return
                continue
            misses = 0
            now = _now()
            self._info.update(heartbeat=_iso(now), heartbeat_unix=now)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
                try:
                    os.write(fd, self._payload())
                finally:
                    os.close(fd)
            except OSError:
                pass  # a transient error; the next beat tries again, and the timeout is ten beats long
