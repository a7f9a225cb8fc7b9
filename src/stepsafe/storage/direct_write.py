"""Data files written around the page cache (``O_DIRECT``), through two reused aligned buffers.

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

A direct write blocks until the device has the bytes, so with one buffer the thread took turns:
fill (copy, and the caller's stream computing checksums), then wait for the disk. A file bigger
than a buffer is double-buffered instead: a short-lived thread of its own writes each full
buffer while the caller fills the other (1.2 GB of float32 in one data file, 2 cores, VM disk,
median of 9: 0.83 s -> 0.58 s; 4 GB in one file, median of 3: 3.28 s -> 2.31 s; the same CPU
seconds within this machine's noise; a 4 GB save split in two files, written by two threads
already, did not change: 2.35 s -> 2.30 s). The helper writes and the caller fills, not the
other way round: the caller's stream (a generator that may hold locks or device buffers, and
whose errors must come out as they are) stays in the caller's thread, and only ``pwrite``,
which releases the GIL, moves. One thread per file, joined before ``write_direct`` returns: a
forked child never inherits one, and a file that fits in one buffer starts none. Memory: two
buffers of ``DIRECT_WRITE_BUFFER_BYTES`` per thread that writes data files (16 MiB at the
default 8 MiB), kept for the process's life; the second is touched only by bigger files.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import itertools
import mmap
import os
import queue
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


def thread_buffers() -> tuple[memoryview, memoryview]:
    """This thread's pair of aligned buffers (private anonymous mappings: page-aligned), kept
    between files so that their pages stay mapped. The second is touched only by files bigger
    than one buffer: a thread that writes only small files has the pages of one."""
    size = max(ALIGN, int(knobs.DIRECT_WRITE_BUFFER_BYTES) // ALIGN * ALIGN)
    pair = getattr(_local, "buffers", None)
    if pair is None or len(pair[0]) != size:
        pair = tuple(
            memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
            for _ in range(2)
        )
        _local.buffers = pair
    return pair


class _Refused(Exception):
    """The filesystem refused a direct write (EINVAL). ``jobs``: the (buffer, bytes, offset)
    not written, oldest (the refused one) first; the buffered way goes on from its offset."""

    def __init__(self, jobs: list[tuple[memoryview, int, int]]) -> None:
        super().__init__("direct write refused")
        self.jobs = jobs


class _Writer:
    """A thread that writes full buffers while the caller fills the other one, so the CPU
    (copy, checksums) and the disk work at once instead of taking turns.

    One per file, started for its second buffer and joined before ``write_direct`` returns: a
    forked child never inherits one, and a small file starts none. Jobs are written in the
    order sent; after a failure nothing more is written (the rest are skipped) and the caller
    gets the error, as itself, at its next ``send`` or ``finish``. At most two jobs are out at
    once: one being written, one waiting (the caller's two buffers).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._todo: queue.SimpleQueue[tuple[memoryview, int, int] | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._sent: collections.deque[tuple[memoryview, int, int]] = collections.deque()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="stepsafe-direct-write", daemon=True)

    def start(self) -> None:
        """Start the thread: apart from making the writer, so that the caller holds it (and
        its ``close``) even when an interrupt lands while the thread starts.

        Raises:
            RuntimeError: no thread can be started (a process at its thread limit).
        """
        self._thread.start()

    def _run(self) -> None:
        failed = False
        while (job := self._todo.get()) is not None:
            if failed or self._stop:  # no write after a failure, or once the caller gave up
                continue
            try:
                _write_block(self._fd, *job)
            except BaseException as e:  # to the caller's thread, as itself
                failed = True
                self._results.put(e)
            else:
                self._results.put(None)

    def send(self, buf: memoryview, n: int, offset: int) -> None:
        """Queue ``buf[:n]`` for ``offset``; return once the buffer sent before it is written
        (free to fill again).

        Raises:
            _Refused: a direct write was refused (EINVAL).
            OSError: a write failed otherwise (ENOSPC, EFBIG, EIO).
        """
        self._todo.put((buf, n, offset))
        self._sent.append((buf, n, offset))
        while len(self._sent) > 1:
            self._confirm()

    def finish(self) -> None:
        """Wait until every job is written.

        Raises:
            _Refused, OSError: as ``send``.
        """
        while self._sent:
            self._confirm()

    def _confirm(self) -> None:
        error = self._results.get()
        if error is None:
            self._sent.popleft()
            return
        self.close()  # nothing is being written now: the unwritten buffers are the caller's
        if isinstance(error, OSError) and error.errno == errno.EINVAL:
            raise _Refused(list(self._sent))
        raise error

    def close(self) -> None:
        """Skip what is still queued and join the thread (a write under way completes). The
        end marker goes in even when the thread does not run (yet): one that an interrupt
        caught while starting still finds it, and ends."""
        if not self._stop:
            self._stop = True
            self._todo.put(None)
        if self._thread.ident is not None:
            self._thread.join()


def write_direct(
    fd: int, chunks: Iterable[memoryview | bytes], buffered: Callable[..., int]
) -> int:
    """Write every chunk to ``fd`` (set for ``O_DIRECT``, empty) in order; the bytes written.
    Chunks are gathered into this thread's two buffers in turn: while one is written (by a
    ``_Writer`` thread; none for a file that fits in one buffer) the next is filled, the
    caller's stream (its checksums) running meanwhile. Should the filesystem refuse a direct
    write (EINVAL: an unaligned length it cut a write to, under a file size limit; a
    filesystem that takes the flag and not the writes), ``O_DIRECT`` is turned off on ``fd``
    and the rest, the unwritten buffers first, goes through ``buffered(fd, chunks, start)``
    from where the direct writes stopped: the same bytes, and a real error (EFBIG) raised as
    itself.

    Raises:
        OSError: as the writes raised it (a full disk, a size limit), in the caller's thread.
    """
    bufs = thread_buffers()
    size = len(bufs[0])
    buf, fill, offset = bufs[0], 0, 0  # offset: where buf's first byte goes
    writer: _Writer | None = None
    threaded = True  # False once no thread could be started: each buffer written here
    end: int | None = None  # the file's size, once known
    direct = True
    view = _EMPTY
    it = iter(chunks)
    try:
        for chunk in it:
            view = memoryview(chunk) if isinstance(chunk, bytes) else memoryview(chunk).cast("B")
            del chunk  # before the stream makes its next chunk (maybe a whole array)
            while len(view):
                if fill == size:  # full and more to come: written while the other one fills
                    if writer is None and threaded:
                        writer = _Writer(fd)
                        try:
                            writer.start()
                        except RuntimeError:  # no thread to be had: one buffer at a time, here
                            writer, threaded = None, False
                    if writer is not None:
                        writer.send(buf, fill, offset)
                    else:
                        _write_here(fd, buf, fill, offset)
                    buf, fill, offset = bufs[1] if buf is bufs[0] else bufs[0], 0, offset + size
                take = min(len(view), size - fill)
                buf[fill : fill + take] = view[:take]
                fill += take
                view = view[take:]
            view = _EMPTY  # an empty slice still holds the chunk
        if writer is not None:
            writer.send(buf, fill, offset)
            writer.finish()
        elif fill == size or (fill and offset):  # exactly one buffer, or the last of buffers
            _write_here(fd, buf, fill, offset)  # written here (no thread): a direct write
        elif fill:  # all in one buffer (a small file): one buffered write and the caller's
            direct = False  # fsync cost less than a direct write's wait
            _buffered_from(fd, 0)
            return buffered(fd, [buf[:fill]], 0)
        end = offset + fill
        return end
    except _Refused as refused:  # the rest the buffered way, from where direct writes stopped
        if writer is not None:
            writer.close()
        direct = False
        end = refused.jobs[0][2]
        _buffered_from(fd, end)
        views = [b[:n] for b, n, _ in refused.jobs]
        end += buffered(fd, itertools.chain(views, _rest(view, it)), end)
        return end
    finally:
        if writer is not None:
            writer.close()
        if end is not None and (end % ALIGN or not direct):
            with contextlib.suppress(OSError):  # the padding, or a partial direct write, off
                os.ftruncate(fd, end)


_EMPTY = memoryview(b"")


def _buffered_from(fd: int, pos: int) -> None:
    """Turn ``O_DIRECT`` off on ``fd`` and put its position at ``pos`` (pwrite never moved it)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
    os.lseek(fd, pos, os.SEEK_SET)


def _write_here(fd: int, buf: memoryview, n: int, offset: int) -> None:
    try:
        _write_block(fd, buf, n, offset)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        raise _Refused([(buf, n, offset)]) from None


def _write_block(fd: int, buf: memoryview, n: int, offset: int) -> None:
    """One direct write of ``buf[:n]`` at ``offset``, zero-padded to the alignment."""
    padded = -(-n // ALIGN) * ALIGN
    if padded > n:
        buf[n:padded] = bytes(padded - n)
    _pwrite_all(fd, buf[:padded], offset)


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
