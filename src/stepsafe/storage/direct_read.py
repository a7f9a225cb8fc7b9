"""Cold reads of data files around the page cache (``O_DIRECT``), through an aligned buffer of
the reading thread; ranges already in the page cache are read from there.

A buffered read of a file that is not cached first fills page-cache pages the kernel allocates
for it, then copies them out. On a virtual machine that hands freed memory back to its host
(virtio-balloon free page reporting, see ``direct_write``) those pages are fresh to the host
every time: a cold 1 GiB file read with buffered 64 MiB ``preadv`` calls took 3.5-5.6 s, read
with ``O_DIRECT`` through one reused 8 MiB buffer 1.2-1.4 s (and 1.0-1.1 s straight into
page-aligned memory). It also keeps a restore from pushing out of the cache what training reads.

Read with ``O_DIRECT``: only runs (bytes that one ``preadv`` would read) of at least one buffer
(``knobs.DIRECT_WRITE_BUFFER_BYTES``; 0: never), and only when most of the run is not in the
page cache (``mincore`` of a mapping of the range, which maps no page): a checkpoint read a
moment ago, or copied in by a tool, is read from memory, many times faster than from the disk.
Linux reports every page of a file the caller neither owns nor may write as resident, so such
a file (another user's checkpoint) is read the buffered way: the same bytes, not faster.
``O_DIRECT`` wants the offset, the length and the buffer aligned, and a restore's arrays are
neither, so the aligned span around the run is read a buffer at a time and the wanted bytes
copied out (memory bandwidth, well above the disk's). The buffer is the reading thread's own,
not one of its write buffers: a stream that reads as it is written (a copy of a step) runs
inside ``write_direct``, whose buffers hold bytes on their way to the disk. A filesystem that
refuses ``O_DIRECT`` (at open or at a read) is read the buffered way: the same bytes.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Sequence

import numpy as np

from stepsafe import knobs
from stepsafe.storage.direct_write import ALIGN

_PAGE = mmap.PAGESIZE
_local = threading.local()


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_longlong,
        ]  # fmt: skip
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def wanted(length: int) -> bool:
    """Whether a run of ``length`` bytes is big enough to be read around the cache."""
    size = int(knobs.DIRECT_WRITE_BUFFER_BYTES)
    return _LIBC is not None and size > 0 and length >= size


def mostly_cached(fd: int, offset: int, length: int) -> bool:
    """Whether more than half of bytes ``offset..offset+length`` of ``fd`` are in the page
    cache (True when that cannot be told: the buffered read is never wrong)."""
    start = offset - offset % _PAGE
    span = offset + length - start
    assert _LIBC is not None
    addr = _LIBC.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, _MAP_FAILED):
        return True
    try:
        vec = np.empty(-(-span // _PAGE), np.uint8)
        if _LIBC.mincore(addr, span, vec.ctypes.data) != 0:
            return True
    finally:
        _LIBC.munmap(addr, span)
    return int(np.count_nonzero(vec & 1)) * 2 > len(vec)


def _buffer() -> memoryview:
    """This thread's aligned read buffer (a private anonymous mapping), kept between reads so
    that its pages stay mapped."""
    size = max(ALIGN, int(knobs.DIRECT_WRITE_BUFFER_BYTES) // ALIGN * ALIGN)
    buf = getattr(_local, "buffer", None)
    if buf is None or len(buf) != size:
        buf = memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
        _local.buffer = buf
    return buf


def read_direct(fd: int, offset: int, views: Sequence[memoryview]) -> int:
    """Fill ``views`` (byte views, one after another) from ``fd`` (opened with ``O_DIRECT``) at
    ``offset``, through this thread's aligned buffer; the bytes filled, fewer only when the
    file ends first.

    Raises:
        OSError: as the reads raised it; EINVAL when the filesystem refuses direct reads.
    """
    buf = _buffer()
    # Copied out by numpy, which lets go of the GIL (a memoryview assignment does not): the
    # I/O threads fill fresh output pages (host faults, on a VM) side by side.
    src = np.frombuffer(buf, np.uint8)
    total = sum(len(v) for v in views)
    end = offset + total
    pos = offset - offset % ALIGN  # the aligned read's position in the file
    it = (np.frombuffer(v, np.uint8) for v in views)
    view, at = next(it, None), 0  # the view being filled, and how much of it is
    filled = 0
    while pos < end:
        want = min(len(buf), -(-(end - pos) // ALIGN) * ALIGN)
        got = os.preadv(fd, [buf[:want]], pos)
        lo = max(offset, pos) - pos  # the wanted bytes in the buffer: lo..hi
        hi = min(end, pos + got) - pos
        while lo < hi and view is not None:
            take = min(hi - lo, len(view) - at)
            view[at : at + take] = src[lo : lo + take]
            lo, at, filled = lo + take, at + take, filled + take
            if at == len(view):
                view, at = next(it, None), 0
        if got < want:  # the end of the file
            break
        pos += got
    return filled


def reopen_direct(fd: int) -> int | None:
    """The file open at ``fd`` opened again for reading with ``O_DIRECT`` (through
    ``/proc/self/fd``: the same file, whatever its path now names); None where that cannot be
    done (a filesystem that refuses ``O_DIRECT``, no ``/proc``): it is then read buffered."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None
