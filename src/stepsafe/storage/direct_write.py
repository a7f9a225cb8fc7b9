"""Data files written around the page cache (``O_DIRECT``), through one reused aligned buffer.

A buffered write copies every byte into page-cache pages the kernel allocates for it. On a
virtual machine that hands freed memory back to its host (virtio-balloon free page reporting),
those pages are fresh to the host every time, and that copy ran at 0.6-2 GB/s of kernel CPU,
different from one run to the next (a 4 GB state: 2.2-7 s, all system time, ``perf``: 55% in
``copy_folio_from_iter_atomic``). Written with ``O_DIRECT`` from a reused buffer the same file
took 1.5-1.7 s at 0.45 CPU s, run after run: the bytes are copied once into memory that stays
mapped, and the disk reads them from there. It also keeps a checkpoint out of the page cache,
where it would push out what training reads.

``O_DIRECT`` wants the buffer, each write's offset and its length aligned (to the device's
logical block; ``ALIGN`` covers 512-byte and 4 KiB ones): the stream's chunks are gathered into
the buffer, written a full buffer at a time, the last one zero-padded to the alignment and the
file then cut to its true size. A filesystem that refuses ``O_DIRECT`` (at open, or at the first
write) gets the same bytes written the buffered way: the flag is a speed hint, never a change in
what is written. The file is fsynced by its caller as any other.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Callable, Iterable

from stepsafe import knobs

ALIGN = 4096
_local = threading.local()


def open_direct(path: str | os.PathLike[str]) -> tuple[int, bool]:
    """Create ``path`` exclusively for writing; (fd, whether it is open for direct I/O):
    direct when ``knobs.DIRECT_WRITE_BUFFER_BYTES`` is on and the filesystem accepts it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if knobs.DIRECT_WRITE_BUFFER_BYTES and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    return os.open(path, flags, 0o644), False


def _buffer() -> memoryview:
    """This thread's aligned buffer (a private anonymous mapping: page-aligned), kept between
    files so that its pages stay mapped."""
    size = max(ALIGN, int(knobs.DIRECT_WRITE_BUFFER_BYTES) // ALIGN * ALIGN)
    buf = getattr(_local, "buffer", None)
    if buf is None or len(buf) != size:
        buf = memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
        _local.buffer = buf
    return buf


def write_direct(
    fd: int, chunks: Iterable[memoryview | bytes], buffered: Callable[[int, Iterable], int]
) -> int:
    """Write every chunk to ``fd`` (opened with ``O_DIRECT``, empty) in order; the bytes
    written. Should the filesystem refuse a direct write, ``O_DIRECT`` is turned off on ``fd``
    and the rest goes through ``buffered(fd, chunks)`` (what is in the buffer first).

    Raises:
        OSError: as the writes raised it (a full disk, a size limit).
    """
    buf = _buffer()
    size = len(buf)
    fill = pos = 0
    direct = True

    def flush(n: int) -> None:
        nonlocal pos, direct
        padded = -(-n // ALIGN) * ALIGN
        if padded > n:
            buf[n:padded] = bytes(padded - n)
        if direct:
            try:
                _pwrite_all(fd, buf[:padded], pos)
                pos += n
                return
            except OSError as e:
                if e.errno != errno.EINVAL or pos:
                    raise
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                direct = False
        pos += buffered(fd, [buf[:n]])

    it = iter(chunks)
    for chunk in it:
        view = memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else memoryview(chunk)
        while len(view):
            take = min(len(view), size - fill)
            buf[fill : fill + take] = view[:take]
            fill += take
            view = view[take:]
            if fill == size:
                flush(fill)
                fill = 0
                if not direct:  # the filesystem refused: the rest the buffered way
                    return pos + buffered(fd, _rest(view, it))
        del chunk, view  # before the stream makes its next chunk (maybe a whole array)
    if fill:
        flush(fill)
        if pos % ALIGN and direct:
            os.ftruncate(fd, pos)  # the last write's padding off
    return pos


def _rest(view: memoryview, chunks: Iterable[memoryview | bytes]) -> Iterable:
    if len(view):
        yield view
    yield from chunks


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.EIO, "a direct write made no progress")
        data = data[n:]
        offset += n
