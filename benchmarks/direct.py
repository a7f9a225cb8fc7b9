"""Writes and cold reads around the page cache (``O_DIRECT``) for the baselines: the raw
writer/reader and the disk's limit. stepsafe writes its data files this way
(``stepsafe.storage.direct_write``) and reads them so when they are not cached
(``stepsafe.storage.direct_read``); a buffered baseline on this VM measures the kernel's work
on fresh page-cache pages (writes 0.6-2 GB/s of system time, different every run; a cold 1 GiB
read 3.5-5.6 s buffered, 1.2-1.4 s direct), not the disk, so the strongest honest baselines go
direct too: one aligned buffer, full-buffer writes, the last one padded and the file cut back;
reads of a file that is not in the page cache go direct, of a cached one through the cache.
Written here on its own (not stepsafe's code): a baseline must not share the code it measures.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable

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


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_longlong
]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def cached(path: str) -> bool:
    """Whether most of the file at ``path`` is in the page cache (``mincore`` of a mapping)."""
    size = os.path.getsize(path)
    if not size:
        return True
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return True
        try:
            pages = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
            if _libc.mincore(addr, size, pages) != 0:
                return True
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(p & 1 for p in pages) * 2 > len(pages)


def read_direct(path: str, buf: memoryview, into: Callable[[memoryview], None]) -> bool:
    """Read the file at ``path`` with ``O_DIRECT`` a buffer (``buf``, aligned) at a time, each
    buffer's bytes handed to ``into`` in order; False (nothing read) where the filesystem
    refuses ``O_DIRECT``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return False
    try:
        pos = 0
        while n := os.preadv(fd, [buf], pos):
            into(buf[:n])
            pos += n
    finally:
        os.close(fd)
    return True
