"""What the format needs from a place that holds bytes, and nothing more.

A checkpoint is written through a ``Transaction``: files appear under their final names only
when ``commit()`` returns, all of them or none (local disk: a temporary sibling directory and one
atomic rename; object stores: a marker written last). Readers address files by path strings in
the storage's own syntax (a local path or a URL) and read byte ranges into caller-owned buffers.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence

from stepsafe import knobs
from stepsafe.errors import StorageError
from stepsafe.storage.ranges import RangeRead, plan_runs
from stepsafe.storage.threads import run_all

MAX_RUN_BYTES = 64 << 20  # one preadv reads at most this (a format chunk's limit)
MAX_RUN_COUNT = 512  # and into at most this many buffers (Linux takes up to 1024)


class Transaction(ABC):
    """The files of one directory-to-be, invisible until ``commit``.

    Several processes may write one directory-to-be (a save under many hosts): one opens the
    transaction and hands ``token()`` to the others, who ``Storage.join_transaction`` it, write
    their own files, and ``prepare``; only the opener commits, once every writer has prepared.
    """

    @abstractmethod
    def write_file(self, relpath: str, chunks: Iterable[memoryview | bytes]) -> None:
        """Write one file from a sequence of buffers; durable once ``commit`` returns."""

    @abstractmethod
    def commit(self) -> None:
        """Make every written file visible at once; raise if the destination exists."""

    @abstractmethod
    def abort(self) -> None:
        """Drop everything written (a joined writer: only its own files); safe to call after
        a failure or twice."""

    def token(self) -> str:
        """What another process passes to ``Storage.join_transaction`` to write into this
        directory-to-be (a local temporary's name; nothing on buckets, which write in place)."""
        return ""

    def prepare(self) -> None:
        """Make every file this writer wrote durable, so that the opener's ``commit`` only has
        to publish them; a no-op where a written file is durable at once (buckets)."""
        return None

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


class ReadHandle(ABC):
    """One file opened for many ranged reads (a local fd; a path for object stores)."""

    @abstractmethod
    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; TruncatedDataError when the file is short."""

    def read_run(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` one after another from ``offset`` (handles that can, in one call)."""
        for buf in bufs:
            self.read_into(offset, buf)
            offset += buf.nbytes

    def close(self) -> None:
        return None


class _PathReadHandle(ReadHandle):
    def __init__(self, storage: Storage, path: str) -> None:
        self.storage, self.path = storage, path

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.storage.read_into(self.path, offset, buf)


class Storage(ABC):
    """Bytes at paths. Paths are strings in this storage's own syntax."""

    default_file_size = 2 << 30  # data file size when the caller names none

    def open_read(self, path: str) -> ReadHandle:
        """A handle for many reads of one file; storages with cheap opens need not override."""
        return _PathReadHandle(self, path)

    def read_ranges(
        self, reads: Sequence[RangeRead], done: Callable[[int], None] = lambda i: None
    ) -> None:
        """Fill every read's buffer; ``done(i)`` runs on the thread that finished read ``i``,
        right after (checksums are taken there, while the bytes are hot in cache), and read
        ``i`` is not touched after it (the caller may drop it from ``reads``, to free its
        buffer early); the first failure, of a read or of ``done``, is raised once every read
        has stopped.

        This default suits files with cheap reads (a local disk): reads that continue each
        other (an array's chunks) go as one run into all their buffers (``ReadHandle.read_run``:
        one ``preadv``), runs on the I/O threads, biggest first so that the last to finish are
        short. Reads and page faults on fresh memory release the GIL, so two cores fill buffers
        about twice as fast as one. After a failure no further read starts: a forged checkpoint
        whose first chunk fails its checksum must not make us fill gigabytes of buffers first.
        """
        handles: dict[str, ReadHandle] = {}
        failed = threading.Event()
        try:
            for r in reads:
                if r.path not in handles:
                    handles[r.path] = self.open_read(r.path)

            def one(run: list[int]) -> None:
                if failed.is_set():
                    return
                try:
                    first = reads[run[0]]
                    handles[first.path].read_run(first.offset, [reads[i].buf for i in run])
                    for i in run:
                        done(i)
                except BaseException:
                    failed.set()
                    raise

            runs = plan_runs(reads, MAX_RUN_BYTES, MAX_RUN_COUNT)
            runs.sort(key=lambda run: -sum(reads[i].buf.nbytes for i in run))
            if sum(r.buf.nbytes for r in reads) < knobs.PARALLEL_BYTES:  # threads cost more
                for run in runs:
                    one(run)
            else:
                run_all(one, runs)
        finally:
            for h in handles.values():
                h.close()

    @abstractmethod
    def join(self, base: str, *parts: str) -> str: ...

    @abstractmethod
    def transaction(self, path: str) -> Transaction:
        """Start writing a new directory at ``path``."""

    def join_transaction(self, path: str, token: str) -> Transaction:
        """Write into the directory-to-be at ``path`` that another process opened (``token``:
        its ``Transaction.token()``). The joined transaction's ``commit`` refuses: the opener
        commits. Storages that live in one process's memory cannot be shared.

        Raises:
            StorageError: this storage cannot be shared, or the opener's directory-to-be is not
                visible here.
        """
        raise StorageError(
            f"{type(self).__name__} cannot be written by several processes at once: save "
            f"{path} to a local directory every process shares, or to a bucket"
        )

    @abstractmethod
    def read_into(self, path: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``path`` at ``offset``; TruncatedDataError when the file is short."""

    @abstractmethod
    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        """The whole file at ``path``. With ``limit``, a file holding more than ``limit`` bytes
        is refused (CorruptCheckpointError) without reading more than ``limit + 1`` of them: a
        checkpoint is untrusted input, and its small files must not become unbounded reads.
        Local disk also refuses anything but a regular file (links, FIFOs, devices)."""

    @abstractmethod
    def size(self, path: str) -> int: ...

    @abstractmethod
    def exists(self, path: str) -> bool: ...

    @abstractmethod
    def is_dir(self, path: str) -> bool: ...

    @abstractmethod
    def list_dir(self, path: str) -> list[str]:
        """Names (not paths) directly under ``path``; empty when it does not exist."""

    @abstractmethod
    def create_exclusive(self, path: str, data: bytes) -> None:
        """Create the small file ``path`` holding ``data`` only if nothing is there;
        FileExistsError if something is. Atomic against other writers (``O_EXCL``, a bucket's
        conditional create): this is what decides a race between them."""

    @abstractmethod
    def put_whole(self, path: str, body: bytes) -> None:
        """Write the small file ``path`` whole, replacing what is there; a reader sees the old
        bytes or the new, never a mix (rename on a disk; one request on a bucket)."""

    def is_link(self, path: str) -> bool:
        """True when ``path`` itself is a symbolic link: deleting through one would delete
        what it points at, outside the run. Object stores have no links."""
        return False

    @abstractmethod
    def delete_file(self, path: str) -> None: ...

    @abstractmethod
    def delete_tree(self, path: str) -> None: ...

    # -- what an interrupted write leaves ----------------------------------------------------
    # A transaction that writes into a temporary sibling and renames it on commit (local disk)
    # leaves that temporary behind when its process dies. These hooks let a listing tell such
    # an entry from the user's files without knowing how this storage names it. Storages that
    # write in place and commit with a marker (buckets) have no temporaries: an uncommitted
    # directory there is one without its marker. These defaults say so.

    def temporary_target(self, name: str) -> str | None:
        """The name that the entry ``name`` takes when its transaction commits (``"300"`` for a
        local ``"300.stepsafe-tmp-<host>-<pid>-<random>"``); None when ``name`` is not one of
        this storage's temporaries (a user's file named alike is not: the name must be exactly
        this storage's)."""
        return None

    def writer_alive(self, path: str) -> bool | None:
        """Whether the process writing the temporary ``path`` still runs: True or False when
        this host can tell (it ran here), None when it cannot (another host, or ``path`` is no
        temporary of this storage)."""
        return None

    def stale_entries(self, directory: str, *, min_age_s: float = 0.0) -> list[str]:
        """Paths of the temporaries directly under ``directory`` whose writes can never
        finish: at once when their process of this host is gone, else once older than
        ``min_age_s`` seconds (only with ``min_age_s > 0``: another host's may still run)."""
        return []

    def unfinished_uploads(self, prefix: str) -> list[tuple[str, str]]:
        """Uploads under ``prefix`` that were started and never completed nor aborted, as
        (path, upload id): a killed save leaves them, invisible to listings but billed (S3
        multipart uploads). None elsewhere: a local write is a file, a GCS resumable upload
        expires by itself."""
        return []

    def abort_upload(self, path: str, upload_id: str) -> None:
        raise NotImplementedError
