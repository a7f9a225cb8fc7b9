"""Object stores through fsspec: a checkpoint committed by a marker, not by a rename.

Buckets have no atomic rename of a prefix, so a transaction writes every file directly under
its final name and makes the step visible by creating one object last, the commit marker
``_CHECKPOINT_METADATA``, with a *conditional create* (S3 ``If-None-Match: *``, GCS
``ifGenerationMatch=0``): of two writers racing for one step exactly one creates it. Readers
(``format.is_committed``, ``checkpoint.locate``) already treat a step without the marker as
incomplete, so a save killed at any moment leaves nothing that looks complete.

The transaction holds the marker's bytes back when the writer hands them over and creates the
object only in ``commit()``; it refuses to start when the step already has a marker. Every
other file is written with a plain PUT under a name the format makes unique per save, so two
racing saves never write the same object: the loser's files are its own, and it deletes them.
Backends (s3.py, gcs.py, memory.py) supply the client, the conditional create and, where the
protocol allows, uploads in parallel parts.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from typing import Any

from stepsafe.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    StepsafeError,
    TruncatedDataError,
)
from stepsafe.storage.base import Storage, Transaction
from stepsafe.storage.budget import IN_FLIGHT
from stepsafe.storage.ranges import RangeRead, Span, byte_view, plan_spans
from stepsafe.storage.threads import run_all

# Must equal stepsafe.format.layout.METADATA_FILE (a test checks): storage sits above format
# in the layer order and cannot import it, but it has to know which file commits.
COMMIT_MARKER = "_CHECKPOINT_METADATA"
FILE_SIZE = 128 << 20  # default data file size on buckets: each goes up in one request
SINGLE_UPLOAD_MAX = 256 << 20  # files up to this size go up in one request
PART_SIZE = 64 << 20  # larger files: multipart parts / resumable pieces of this size
MIN_PART = 8 << 20  # S3 needs >= 5 MiB, GCS multiples of 256 KiB
READ_SPAN = 64 << 20  # ranged reads: neighbouring ranges merged into requests this big
READ_GAP = 1 << 20  # ranges closer than this share a request


def transfer_sizes() -> tuple[int, int, int]:
    """(largest one-request upload, part size, largest ranged read) under the bytes-in-flight
    budget: a small budget gets smaller transfers, so that two fit in it at once."""
    half = IN_FLIGHT.limit // 2
    part = max(MIN_PART, min(PART_SIZE, half) >> 18 << 18)
    return min(SINGLE_UPLOAD_MAX, IN_FLIGHT.limit), part, max(1 << 20, min(READ_SPAN, half))


def gather_parts(chunks: Iterable[memoryview | bytes], part_size: int) -> Iterator[bytes]:
    """The concatenation of ``chunks`` cut into ``part_size`` pieces (the last may be shorter,
    and there is at least one, maybe empty): only one part is buffered at a time."""
    buf = bytearray()
    yielded = False
    for chunk in chunks:
        view = memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else memoryview(chunk)
        while len(view):
            take = min(part_size - len(buf), len(view))
            buf += view[:take]
            view = view[take:]
            if len(buf) == part_size:
                yield bytes(buf)
                buf.clear()
                yielded = True
    if buf or not yielded:
        yield bytes(buf)


def small_enough(
    chunks: Iterable[memoryview | bytes], limit: int
) -> tuple[list[memoryview | bytes] | None, Iterator[memoryview | bytes]]:
    """``(chunks as a list, _)`` when they add up to at most ``limit`` bytes, else ``(None,
    the same chunks)``: looks ahead without copying (views of the caller's buffers)."""
    it = iter(chunks)
    head: list[memoryview | bytes] = []
    size = 0
    for chunk in it:
        head.append(chunk)
        size += memoryview(chunk).nbytes
        if size > limit:
            return None, chain(head, it)
    return head, iter(())


class RemoteStorage(Storage):
    """Bytes at URLs of one fsspec filesystem. Paths keep their scheme (``s3://b/k``)."""

    scheme = ""
    default_file_size = FILE_SIZE

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    # -- hooks for backends ------------------------------------------------------------------
    def create_exclusive(self, path: str, data: bytes) -> None:
        """Must be atomic on the server (each backend's conditional create): the commit
        marker's race between writers is decided here."""
        raise NotImplementedError

    def put_whole(self, path: str, body: bytes) -> None:
        """Write ``path`` (overwriting) in one request."""
        self.fs.pipe_file(path, body)

    def put_parts(self, path: str, chunks: Iterable[memoryview | bytes], part: int) -> None:
        """Write ``path`` (overwriting) from a stream too big for one request, ``part`` bytes
        at a time, one after the other (two parts' worth of memory: ours and the client's
        buffer). Backends may send parts in parallel."""
        with IN_FLIGHT.hold(2 * part), self.fs.open(path, "wb", block_size=part) as f:
            for piece in gather_parts(chunks, part):
                f.write(piece)

    def upload(self, path: str, chunks: Iterable[memoryview | bytes]) -> None:
        """One request per file where the file is small enough: a request is a round trip,
        and servers do work per request (a multipart upload is reassembled at the end; a
        resumable one is rehashed per piece by fake-gcs-server). Bigger files go in parts."""
        single_max, part, _ = transfer_sizes()
        head, rest = small_enough(chunks, single_max)
        if head is None:
            self.put_parts(path, rest, part)
            return
        with IN_FLIGHT.hold(max(sum(memoryview(c).nbytes for c in head), 1)):
            self.put_whole(path, b"".join(head))  # the one copy, within the budget

    # -- Storage -----------------------------------------------------------------------------
    def join(self, base: str, *parts: str) -> str:
        if not parts:
            return base
        out = base if base.endswith("://") else base.rstrip("/") + "/"
        return out + "/".join(p.strip("/") for p in parts)

    def transaction(self, path: str) -> RemoteTransaction:
        return RemoteTransaction(self, path.rstrip("/"))

    def read_into(self, path: str, offset: int, buf: memoryview) -> None:
        self.read_ranges([RangeRead(path, offset, byte_view(buf))])

    def read_ranges(
        self, reads: Sequence[RangeRead], done: Callable[[int], None] = lambda i: None
    ) -> None:
        """Neighbouring ranges merged into ranged GETs of up to ``READ_SPAN`` bytes, several
        in flight on the I/O threads within the bytes-in-flight budget; each reply is copied
        straight into the buffers it covers (no other staging copy)."""
        _, _, span_max = transfer_sizes()
        spans = plan_spans(reads, span_max, READ_GAP)
        waiting = [0] * len(reads)
        for span in spans:
            for i, *_ in span.pieces:
                waiting[i] += 1
        lock = threading.Lock()

        def fetch(span: Span) -> None:
            with IN_FLIGHT.hold(span.end - span.start):
                data = memoryview(self._fetch(span.path, span.start, span.end))
                for i, at, pos, n in span.pieces:
                    byte_view(reads[i].buf)[at : at + n] = data[pos : pos + n]
            finished = []
            with lock:
                for i, *_ in span.pieces:
                    waiting[i] -= 1
                    if waiting[i] == 0:
                        finished.append(i)
            for i in finished:
                done(i)

        for i in [i for i, r in enumerate(reads) if r.buf.nbytes == 0]:
            done(i)
        run_all(fetch, spans)

    def _fetch(self, path: str, start: int, end: int) -> bytes:
        try:
            data = self.fs.cat_file(path, start=start, end=end)
        except FileNotFoundError as e:
            raise TruncatedDataError(f"data file {path} is missing") from e
        except OSError as e:
            self._raise_read_error(path, start, end - start, e)
        if len(data) != end - start:
            self._raise_short(path, start, end - start)
        return data

    def _raise_short(self, path: str, offset: int, n: int) -> None:
        try:
            size: int | str = self.size(path)
        except OSError:
            size = "unknown"
        raise TruncatedDataError(
            f"data file {path} is truncated: needed bytes {offset}..{offset + n}, file has {size}"
        )

    def _raise_read_error(self, path: str, offset: int, n: int, e: BaseException) -> None:
        try:
            short = self.size(path) < offset + n
        except OSError:
            short = False
        if short:
            self._raise_short(path, offset, n)
        raise StepsafeError(f"reading {path} (bytes {offset}..{offset + n}) failed: {e}") from e

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        if limit is None:
            return self.fs.cat_file(path)
        try:  # one ranged GET: never more than limit + 1 bytes, whatever the object holds
            data = self.fs.cat_file(path, start=0, end=limit + 1)
        except FileNotFoundError:
            raise
        except Exception:
            if self.size(path) == 0:  # servers refuse any range of an empty object (416)
                return b""
            raise
        if len(data) > limit:
            raise CorruptCheckpointError(
                f"{path} holds more than the {limit} bytes stepsafe ever writes to such a "
                "file: it is damaged or was not written by stepsafe; it was not read"
            )
        return data

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def is_dir(self, path: str) -> bool:
        return bool(self.fs.isdir(path))

    def list_dir(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = self.fs._strip_protocol(path).rstrip("/")
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != base}
        return sorted(n for n in names if n)

    def delete_file(self, path: str) -> None:
        self.fs.rm_file(path)

    def delete_tree(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)


class RemoteTransaction(Transaction):
    """Files written in place; visible when ``commit`` creates the marker exclusively."""

    def __init__(self, storage: RemoteStorage, path: str) -> None:
        self.storage = storage
        self.path = path
        self.marker_path = storage.join(path, COMMIT_MARKER)
        if storage.exists(self.marker_path):
            raise CheckpointExistsError(
                f"{path} already holds a committed checkpoint: stepsafe never overwrites one; "
                "save to a new path or delete the old one first"
            )
        self._written: list[str] = []
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self._done = False

    def write_file(self, relpath: str, chunks: Iterable[memoryview | bytes]) -> None:
        if relpath.strip("/") == COMMIT_MARKER:
            self._marker = b"".join(bytes(c) for c in chunks)  # created by commit()
            return
        target = self.storage.join(self.path, relpath)
        with self._lock:
            self._written.append(target)  # before the upload: a failed one may leave bytes
        self.storage.upload(target, chunks)

    def commit(self) -> None:
        if self._marker is None:
            raise StepsafeError(
                f"nothing to commit at {self.path}: on object stores a transaction becomes "
                f"visible through its {COMMIT_MARKER} file, and none was written"
            )
        try:
            self.storage.create_exclusive(self.marker_path, self._marker)
        except FileExistsError as e:
            owner = self._marker_owner()
            if owner == "ours":  # a retried create whose first try succeeded
                self._done = True
                return
            if owner == "other":
                self._delete_written()
            self._done = True  # "unknown": leaving files is safe, deleting might not be
            raise CheckpointExistsError(
                f"{self.path} was committed by another writer while this save ran; "
                "this save was discarded"
            ) from e
        except Exception:
            if self._marker_owner() == "ours":  # created, but the reply was lost
                self._done = True
                return
            raise
        self._done = True

    def _marker_owner(self) -> str:
        """Whose marker is at the step: "ours" (it holds our bytes, which include our save id
        and nanosecond timestamps), "other", "none", or "unknown" when it cannot be read."""
        try:
            raw = self.storage.read_bytes(self.marker_path)
        except FileNotFoundError:
            return "none"
        except Exception:
            return "unknown"
        return "ours" if raw == self._marker else "other"

    def abort(self) -> None:
        """Delete what this save wrote, unless its marker may have been created (a commit
        whose reply was lost): no other save writes these names, so no one else is hurt."""
        if self._done:
            return
        if self._marker is not None and self._marker_owner() in ("ours", "unknown"):
            self._done = True
            return
        self._delete_written()

    def _delete_written(self) -> None:
        self._done = True
        for target in self._written:
            with contextlib.suppress(Exception):
                self.storage.delete_file(target)
