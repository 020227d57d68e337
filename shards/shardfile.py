"""ShardFile: the file object a shard's tar is written to.

A shard is written once, sequentially, and read much later by other machines, so the page cache only
gets in the way: on an ingestion node whose memory is full of source files, every page of a buffered
write must first be reclaimed from that cache and later written back by the kernel. On the 2-core
development VM, writing 4 GiB buffered (then fsync) took 3 to 10.6 CPU-seconds, varying from run to
run with the cache's state; with O_DIRECT it took 0.2.
ShardFile therefore writes with O_DIRECT where the filesystem allows it: bytes are gathered in
page-aligned blocks and background threads write each full block straight to the device, up to
IN_FLIGHT at once, while the next one fills (the worker computes, the disk writes). The threads are a
process-wide pool started once: a new thread per 2 MiB block made the worker wait ~0.3 ms for it to be
scheduled whenever every core was busy (8 % of a worker's convert time with 2 workers on 2 cores). The last block
is padded to the alignment and the file truncated to its true size. Filesystems without O_DIRECT (older tmpfs, many FUSE mounts)
get ordinary writes, with a background fdatasync every SYNC_EVERY bytes, so that the fsync before a
shard's commit never waits for a whole shard either.

Every byte also goes through CRC-32 on the way, so the whole tar's checksum costs no second read.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .checksum import crc32

BLOCK = 2 << 20  # bytes per background write: small enough that a commit rarely waits on one
# O_DIRECT writes at once. A queued write first needs the GIL, which the converting thread holds for up
# to the 5 ms switch interval, while a 2 MiB block fills in ~2 ms: with 2 in flight a worker waited for
# its writes 6-10 % of its convert time (0.8 s of 12.4 s for 20 k CT slices), with 4 about 1 %.
IN_FLIGHT = 4
SYNC_EVERY = 8 << 20  # without O_DIRECT: bytes between background fdatasyncs
ALIGN = 4096     # O_DIRECT offset / length / address alignment (mmap memory is page-aligned)

# Blocks of closed shard files, reused by the next one in this process: a fresh anonymous mapping costs
# one page fault per 4 KiB on first touch (2,560 per shard with five 2 MiB blocks; on the development
# VM a fault costs ~6 us, so a worker writing a shard every 0.2 s spent ~5 % of its time faulting).
_SPARE_BLOCKS: list[mmap.mmap] = []
_POOLS_LOCK = threading.Lock()  # guards the spare blocks and the write pool below
MAX_SPARE_BLOCKS = 2 * (IN_FLIGHT + 1)


MAX_WRITE_THREADS = 16  # writes in flight in one process, all its shard files together
_WRITE_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child starts its own


def _write_pool() -> ThreadPoolExecutor:
    global _WRITE_POOL
    with _POOLS_LOCK:
        if _WRITE_POOL is None or _WRITE_POOL[0] != os.getpid():
            _WRITE_POOL = (os.getpid(), ThreadPoolExecutor(MAX_WRITE_THREADS, thread_name_prefix="shardfile-write"))
        return _WRITE_POOL[1]


def _new_block() -> mmap.mmap:
    with _POOLS_LOCK:
        while _SPARE_BLOCKS:
            block = _SPARE_BLOCKS.pop()
            if len(block) == BLOCK:
                return block
            block.close()  # BLOCK was changed (tests do): a block of the old size would not fit
    return mmap.mmap(-1, BLOCK)


def _release_block(block: mmap.mmap) -> None:
    with _POOLS_LOCK:
        if len(_SPARE_BLOCKS) < MAX_SPARE_BLOCKS:
            _SPARE_BLOCKS.append(block)
            return
    block.close()


class ShardFile:
    """Write-only, sequential, checksummed; `close(sync=True)` returns once the bytes are durable."""

    def __init__(self, path: str | os.PathLike, direct: bool = True):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o644)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        if not self.direct:
            self._fd = os.open(path, flags, 0o644)
        self.path = Path(path)
        self.crc = 0
        self.size = 0
        self._blocks = [_new_block() for _ in range(IN_FLIGHT + 1)]
        self._current = 0     # index of the block being filled
        self._fill = 0        # bytes in it
        self._offset = 0      # file offset of its first byte
        self._writers: list[Future] = []  # writes in flight, oldest first
        self._error: BaseException | None = None
        self._sync: threading.Thread | None = None  # buffered mode's background fdatasync
        self._synced = 0
        self.closed = False

    # ------------------------------------------------------------ file-object interface used by tarfile
    def write(self, data) -> int:
        if self.closed:
            raise ValueError(f"write to closed shard file {self.path}")
        view = memoryview(data).cast("B")
        n = len(view)
        self.crc = crc32(view, self.crc)
        self.size += n
        if not self.direct:
            self._drain_blocks()
            return self._write_buffered(view)
        pos = 0
        while pos < n:
            block = self._blocks[self._current]
            k = min(BLOCK - self._fill, n - pos)
            block[self._fill:self._fill + k] = view[pos:pos + k]
            self._fill += k
            pos += k
            if self._fill == BLOCK:
                self._hand_off(BLOCK)
        return n

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass  # blocks are written as they fill; close(sync=True) makes everything durable

    # ------------------------------------------------------------ background writes
    def _hand_off(self, length: int) -> None:
        """Write the current block (its first `length` bytes) in the background; fill the next one
        (once the write that last used it has finished)."""
        block, offset = self._blocks[self._current], self._offset
        self._writers.append(_write_pool().submit(self._write_block, block, length, offset))
        self._offset += length
        self._current = (self._current + 1) % len(self._blocks)
        self._fill = 0
        if len(self._writers) > IN_FLIGHT:
            self._writers.pop(0).result()  # the block about to be filled is free again
        self._raise_error()

    def _pwrite_all(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def _write_block(self, block: mmap.mmap, length: int, offset: int) -> None:
        try:
            # views released on the way out, error or not: the traceback of a failed write (disk full)
            # keeps this frame alive, and a live view of the block would make closing the block fail
            with memoryview(block) as whole, whole[:length] as view:
                try:
                    self._pwrite_all(view, offset)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._buffered()  # the filesystem opened with O_DIRECT but refuses its writes
                    self._pwrite_all(view, offset)
        except BaseException as e:  # re-raised in the writing thread at the next hand-off or close
            self._error = e

    def _drain_blocks(self) -> None:
        """After a switch from O_DIRECT: write what the blocks still hold, so offsets stay contiguous."""
        if not self._writers and not self._fill:
            return
        self._wait()
        if self._fill:
            with memoryview(self._blocks[self._current]) as whole, whole[:self._fill] as view:
                self._pwrite_all(view, self._offset)
            self._offset += self._fill
            self._fill = 0

    def _write_buffered(self, view: memoryview) -> int:
        """Without O_DIRECT: a plain write (a copy into the page cache), and every SYNC_EVERY bytes an
        fdatasync in the background, skipped while the previous one still runs, so that the commit's
        fsync finds little left to write and the worker never waits for the disk before it."""
        self._pwrite_all(view, self.size - len(view))
        if self.size - self._synced >= SYNC_EVERY and (self._sync is None or not self._sync.is_alive()):
            self._synced = self.size
            self._sync = threading.Thread(target=os.fdatasync, args=(self._fd,), daemon=True)
            self._sync.start()
        return len(view)

    def _buffered(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def _wait(self) -> None:
        if self._sync is not None:
            self._sync.join()  # never fsync or close the descriptor under a running fdatasync
            self._sync = None
        while self._writers:
            self._writers.pop(0).result()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # ------------------------------------------------------------ end
    def close(self, sync: bool = False) -> None:
        """sync=True: write the rest and return once the whole file is durable (the commit's precondition).
        sync=False: stop writing (an aborted shard, whose file the caller deletes)."""
        if self.closed:
            return
        clean = False  # every write joined without error: the blocks are free for the next shard file
        try:
            if sync:
                self._wait()  # first: a failed O_DIRECT write may have switched to buffered writes
                if self._fill:
                    # O_DIRECT writes whole aligned blocks: pad, then cut the file to its true size
                    self._hand_off(-(-self._fill // ALIGN) * ALIGN if self.direct else self._fill)
                    self._wait()
                    os.ftruncate(self._fd, self.size)
                os.fsync(self._fd)
                clean = True
            else:
                try:
                    self._wait()
                    clean = True
                except Exception:
                    pass  # the shard is being thrown away
        finally:
            self.closed = True
            os.close(self._fd)
            for block in self._blocks:
                if clean:
                    _release_block(block)  # padding past the true size is stale bytes, cut by ftruncate
                    continue
                try:
                    block.close()
                except BufferError:
                    pass  # still viewed from the traceback of the error being raised: freed with it
