"""Data files written around the page cache (``O_DIRECT``), through one reused aligned buffer.

A buffered write copies every byte into page-cache pages the kernel allocates for it. On a
virtual machine that hands freed memory back to its host (virtio-balloon free page reporting),
those pages are fresh to the host every time, and that copy ran at 0.6-2 GB/s of kernel CPU,
different from one run to the next (a 4 GB state: 2.2-7 s, all system time, ``perf``: 55% in
``copy_folio_from_iter_atomic``). Written with ``O_DIRECT`` from a reused buffer the same file
took 1.5-1.7 s at 0.45 CPU s, run after run: the bytes are copied once into memory that stays
mapped, and the disk reads them from there. It also keeps a checkpoint out of the page cache,
where it would push out what training reads.

A file smaller than the buffer is written the buffered way (one write, then the caller's
fsync): a synchronous direct write of a few KiB cost a tiny checkpoint's save several times
safetensors' buffered one. ``O_DIRECT`` wants the buffer, each write's offset and its length
aligned (to the device's logical block; ``ALIGN`` covers 512-byte and 4 KiB ones): the
stream's chunks are gathered into the buffer, written a full buffer at a time, the last one
zero-padded to the alignment and the file then cut to its true size. A filesystem that
refuses ``O_DIRECT`` (at open, or at a write) gets the same bytes written the buffered way: the
flag is a speed hint, never a change in what is written. The file is fsynced by its caller.
"""

from __future__ import annotations

import contextlib
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
    """Create ``path`` exclusively for writing; (fd, whether it is set for direct I/O): direct
    when ``knobs.DIRECT_WRITE_BUFFER_BYTES`` is on and the filesystem accepts it. The flag is
    set after the file is made: a filesystem that refuses ``O_DIRECT`` at open has made the
    file already (ramfs), so opening it again with ``O_EXCL`` would fail."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    if not knobs.DIRECT_WRITE_BUFFER_BYTES or not hasattr(os, "O_DIRECT"):
        return fd, False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            os.close(fd)
            raise
        return fd, False
    return fd, True


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
    fd: int, chunks: Iterable[memoryview | bytes], buffered: Callable[..., int]
) -> int:
    """Write every chunk to ``fd`` (set for ``O_DIRECT``, empty) in order; the bytes written.
    Should the filesystem refuse a direct write (EINVAL: an unaligned length it cut a write
    to, under a file size limit; a filesystem that takes the flag and not the writes),
    ``O_DIRECT`` is turned off on ``fd`` and the rest, that buffer first, goes through
    ``buffered(fd, chunks, start)`` from where the direct writes stopped: the same bytes, and
    a real error (EFBIG) raised as itself.

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
        try:
            _pwrite_all(fd, buf[:padded], pos)
            pos += n
            return
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        buffered_from_here()
        pos += buffered(fd, [buf[:n]], pos)

    def buffered_from_here() -> None:
        nonlocal direct
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        os.lseek(fd, pos, os.SEEK_SET)  # pwrite never moved the position
        direct = False

    try:
        it = iter(chunks)
        for chunk in it:
            view = (
                memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else memoryview(chunk)
            )
            while len(view):
                take = min(len(view), size - fill)
                buf[fill : fill + take] = view[:take]
                fill += take
                view = view[take:]
                if fill == size:
                    flush(fill)
                    fill = 0
                    if not direct:  # refused: the rest the buffered way
                        pos += buffered(fd, _rest(view, it), pos)
                        return pos
            del chunk, view  # before the stream makes its next chunk (maybe a whole array)
        if fill and not pos:  # all in one buffer (a small file): one buffered write and the
            buffered_from_here()  # caller's fsync cost less than a direct write's wait
            pos += buffered(fd, [buf[:fill]], 0)
        elif fill:
            flush(fill)
        return pos
    finally:
        if pos % ALIGN or not direct:
            with contextlib.suppress(OSError):  # the padding, or a partial direct write, off
                os.ftruncate(fd, pos)


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
