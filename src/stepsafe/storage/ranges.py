"""Many byte ranges to read at once, and how to merge them into few large requests.

A restore wants hundreds of ranges (one per chunk of every array) from a few data files. On a
local disk each is one ``preadv``; on a bucket each would be one GET, and a GET costs a round
trip however small it is (moto even copies the whole object for every ranged GET). Arrays are
packed back to back in their files, so neighbouring ranges merge into spans of tens of MiB
that cover many arrays with one request each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class RangeRead(NamedTuple):
    """Fill ``buf`` (a 1-D byte view) with the bytes of ``path`` from ``offset``. A tuple:
    a restore makes one per chunk, hundreds per checkpoint, and tuples are quick to make."""

    path: str
    offset: int
    buf: memoryview


@dataclass
class Span:
    """One request: bytes ``start..end`` of ``path``, scattered into the reads it covers as
    ``(read index, position in its buffer, position in the span, length)``."""

    path: str
    start: int
    end: int
    pieces: list[tuple[int, int, int, int]] = field(default_factory=list)


def byte_view(buf: memoryview) -> memoryview:
    return buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")


def plan_spans(reads: Sequence[RangeRead], max_span: int, max_gap: int) -> list[Span]:
    """Spans of at most ``max_span`` bytes covering every read; reads of one file closer than
    ``max_gap`` bytes share a span (the gap is fetched and dropped: cheaper than a request),
    and a read bigger than ``max_span`` is split over several."""
    order = sorted(range(len(reads)), key=lambda i: (reads[i].path, reads[i].offset))
    spans: list[Span] = []
    cur: Span | None = None
    for i in order:
        r = reads[i]
        n = r.buf.nbytes
        pos = 0
        while pos < n:
            at = r.offset + pos
            if (
                cur is None
                or cur.path != r.path
                or at > cur.end + max_gap
                or at - cur.start >= max_span
            ):
                cur = Span(r.path, at, at)
                spans.append(cur)
            take = min(n - pos, cur.start + max_span - at)
            cur.pieces.append((i, pos, at - cur.start, take))
            cur.end = max(cur.end, at + take)
            pos += take
    return spans


def plan_runs(reads: Sequence[RangeRead], max_bytes: int, max_count: int) -> list[list[int]]:
    """The reads grouped into runs: reads of one file that continue each other exactly (the
    chunks of an array lie back to back), at most ``max_bytes`` and ``max_count`` per run, so
    that a local disk reads each run with one ``preadv`` into all of its buffers."""
    order = sorted(range(len(reads)), key=lambda i: (reads[i].path, reads[i].offset))
    runs: list[list[int]] = []
    end, size, path = -1, 0, None
    for i in order:
        r = reads[i]
        n = r.buf.nbytes
        if (
            runs
            and r.path == path
            and r.offset == end
            and size + n <= max_bytes
            and len(runs[-1]) < max_count
        ):
            runs[-1].append(i)
            size += n
        else:
            runs.append([i])
            size = n
        path, end = r.path, r.offset + n
    return runs
