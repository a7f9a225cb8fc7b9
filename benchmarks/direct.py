"""Writes around the page cache (``O_DIRECT``) for the baselines: the raw writer and the disk's
limit. stepsafe writes its data files this way (``stepsafe.storage.direct_write``); a buffered
baseline on this VM measures the kernel's copy into fresh page-cache pages (0.6-2 GB/s of
system time, different every run), not the disk, so the strongest honest baselines go direct
too: one aligned buffer, full-buffer writes, the last one padded and the file cut back.
Written here on its own (not stepsafe's code): a baseline must not share the code it measures.
"""

from __future__ import annotations

import errno
import mmap
import os

ALIGN = 4096


def aligned(size: int) -> memoryview:
    """A page-aligned buffer of ``size`` bytes (a private anonymous mapping), touched once."""
    buf = memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    buf[:] = bytes(size)
    return buf


def open_write(path: str) -> tuple[int, bool]:
    """``path`` created for writing: (fd, opened with O_DIRECT)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        return os.open(path, flags | os.O_DIRECT, 0o644), True
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return os.open(path, flags, 0o644), False


def write_at(fd: int, buf: memoryview, n: int, pos: int, direct: bool) -> None:
    """Write ``buf[:n]`` at ``pos``; direct writes are padded to ``ALIGN`` (cut by ``finish``)."""
    padded = -(-n // ALIGN) * ALIGN if direct else n
    if padded > n:
        buf[n:padded] = bytes(padded - n)
    view = buf[:padded]
    while view:
        k = os.pwrite(fd, view, pos)
        view, pos = view[k:], pos + k


def finish(fd: int, size: int, direct: bool) -> None:
    """Cut the padding off and make the file durable (fsync)."""
    if direct and size % ALIGN:
        os.ftruncate(fd, size)
    os.fsync(fd)
