"""Object stores through fsspec: bytes at URLs, transfers bounded by a budget.

A checkpoint on a bucket is committed by a marker, not by a rename (remote_transaction.py).
Backends (s3.py, gcs.py, memory.py) supply the client, the conditional create and, where the
protocol allows, uploads in parallel parts; everything here uses fsspec's public filesystem
methods only (``pipe_file``, ``open``, ``cat_file``, ``ls``, ``size``, ``rm``...).

Transfer sizes are knobs (``knobs.SINGLE_UPLOAD_MAX``, ``PART_SIZE``, ``READ_SPAN``,
``READ_GAP``, ``BUCKET_FILE_SIZE``), read at each transfer, and shrink to fit the storage's
bytes-in-flight budget (budget.py).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from typing import Any

from stepsafe import knobs
from stepsafe.errors import CorruptCheckpointError, StepsafeError, TruncatedDataError
from stepsafe.storage.base import Storage
from stepsafe.storage.budget import IN_FLIGHT, ByteBudget
from stepsafe.storage.ranges import RangeRead, Span, byte_view, plan_spans
from stepsafe.storage.remote_transaction import COMMIT_MARKER, RemoteTransaction
from stepsafe.storage.threads import run_all

__all__ = ["COMMIT_MARKER", "RemoteStorage", "RemoteTransaction", "gather_parts"]

MIN_PART = 8 << 20  # a protocol rule: S3 needs >= 5 MiB parts, GCS multiples of 256 KiB


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
        del chunk, view  # before the stream makes its next chunk
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
    """Bytes at URLs of one fsspec filesystem. Paths keep their scheme (``s3://b/k``).

    Args:
        fs: the fsspec filesystem (one per scheme and configuration, shared: it holds the
            connection pools).
        budget: bounds this storage's bytes in flight; None shares the process default.
    """

    scheme = ""

    def __init__(self, fs: Any, budget: ByteBudget | None = None) -> None:
        self.fs = fs
        self.budget = budget if budget is not None else IN_FLIGHT

    @property
    def default_file_size(self) -> int:  # type: ignore[override]
        return knobs.BUCKET_FILE_SIZE

    def with_budget(self, budget: ByteBudget) -> RemoteStorage:
        """This storage (the same client) under its own budget; this one is unchanged."""
        other = copy.copy(self)
        other.budget = budget
        return other

    def transfer_sizes(self) -> tuple[int, int, int]:
        """(largest one-request upload, part size, largest ranged read) under the budget: a
        small budget gets smaller transfers, so that two fit in it at once."""
        limit = self.budget.limit
        half = limit // 2
        part = max(MIN_PART, min(knobs.PART_SIZE, half) >> 18 << 18)
        return min(knobs.SINGLE_UPLOAD_MAX, limit), part, max(1 << 20, min(knobs.READ_SPAN, half))

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
        with self.budget.hold(2 * part), self.fs.open(path, "wb", block_size=part) as f:
            for piece in gather_parts(chunks, part):
                f.write(piece)

    def upload(self, path: str, chunks: Iterable[memoryview | bytes]) -> None:
        """One request per file where the file is small enough: a request is a round trip,
        and servers do work per request (a multipart upload is reassembled at the end; a
        resumable one is rehashed per piece by fake-gcs-server). Bigger files go in parts."""
        single_max, part, _ = self.transfer_sizes()
        head, rest = small_enough(chunks, single_max)
        if head is None:
            self.put_parts(path, rest, part)
            return
        with self.budget.hold(max(sum(memoryview(c).nbytes for c in head), 1)):
            self.put_whole(path, b"".join(head))  # the one copy, within the budget

    # -- Storage -----------------------------------------------------------------------------
    def join(self, base: str, *parts: str) -> str:
        if not parts:
            return base
        out = base if base.endswith("://") else base.rstrip("/") + "/"
        return out + "/".join(p.strip("/") for p in parts)

    def transaction(self, path: str) -> RemoteTransaction:
        return RemoteTransaction(self, path.rstrip("/"))

    def join_transaction(self, path: str, token: str) -> RemoteTransaction:
        return RemoteTransaction(self, path.rstrip("/"), joined=True)

    def read_into(self, path: str, offset: int, buf: memoryview) -> None:
        self.read_ranges([RangeRead(path, offset, byte_view(buf))])

    def read_ranges(
        self, reads: Sequence[RangeRead], done: Callable[[int], None] = lambda i: None
    ) -> None:
        """Neighbouring ranges merged into ranged GETs of up to ``knobs.READ_SPAN`` bytes, several
        in flight on the I/O threads within the bytes-in-flight budget; each reply is copied
        straight into the buffers it covers (no other staging copy)."""
        _, _, span_max = self.transfer_sizes()
        spans = plan_spans(reads, span_max, knobs.READ_GAP)
        waiting = [0] * len(reads)
        for span in spans:
            for i, *_ in span.pieces:
                waiting[i] += 1
        lock = threading.Lock()

        def fetch(span: Span) -> None:
            with self.budget.hold(span.end - span.start):
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
        # fsspec lists "bucket/key" (memory://: "/bucket/key"); a file lists as itself
        base = path.split("://", 1)[-1].strip("/")
        names = {e.strip("/").rsplit("/", 1)[-1] for e in entries if e.strip("/") != base}
        return sorted(n for n in names if n)

    def delete_file(self, path: str) -> None:
        self.fs.rm_file(path)

    def delete_tree(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)
