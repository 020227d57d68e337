"""Durable atomic file writes: the one helper every medswav writer uses for a whole-file replace.

The content goes to a hidden temporary sibling (`layout.temporary`, ignored by globs and by pyarrow's
discovery, reported by `verify` when left behind), is fsynced, renamed over the target, and the folder
is fsynced so that the rename itself survives a power loss. Readers see the old file or the new one,
never half of one; on any failure the temporary is removed and the old file is left as it was.
"""
from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Callable

from .layout import temporary


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the entries of `folder` (a rename, a new name) durable. Filesystems that cannot sync a
    folder (some FUSE and network mounts answer EINVAL) are left as they are."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object], *,
                     exclusive: bool = False, durable: bool = True) -> bool:
    """Write `path` whole or not at all: `write(temporary)` writes the complete content to the path it is
    given; then fsync, rename into place, fsync the folder.

    exclusive=True creates `path` only if it does not exist (hard link instead of rename, which fails
    on an existing name): returns False, leaving the existing file alone, when another writer was first.
    durable=False skips both fsyncs: for caches that are rebuilt when lost (still atomic for readers).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        if durable:
            _fsync_file(tmp)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a rename there is nothing left to remove
    if durable:
        fsync_dir(path.parent)
    return True


def write_bytes_atomically(path: str | os.PathLike, data: bytes, **kwargs) -> bool:
    return write_atomically(path, lambda tmp: tmp.write_bytes(data), **kwargs)


def write_text_atomically(path: str | os.PathLike, text: str, encoding: str = "utf-8", **kwargs) -> bool:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding=encoding), **kwargs)


def write_parquet_atomically(table, path: str | os.PathLike, **options) -> None:
    """One Parquet file (zstd unless `options` say otherwise) from a pyarrow table."""
    import pyarrow.parquet as pq

    options.setdefault("compression", "zstd")
    write_atomically(path, lambda tmp: pq.write_table(table, tmp, **options))
