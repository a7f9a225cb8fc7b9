"""Which saved bytes fill the wanted boxes of an array, and where they go.

A restore wants boxes (a whole array, or the shards this process's devices hold) that need not
match the boxes it was saved in. Each saved shard that overlaps is read once: straight into an
output when it lands there as one contiguous block (always for an array restored as it was
saved, and for shards split along the first axis), else into a buffer of its own, shared by
every box that needs part of it, and copied from. Of such a shard only the chunks that hold the
wanted bytes are read (the span from the first wanted element to the last, in C order): a
process restoring its quarter of rows of an array saved whole reads about a quarter of it,
plus at most a chunk at either end, since checksums cover whole chunks. The buffer is the
shard's shape but only the read part is ever touched, so it costs memory only for that part.
Planning first and reading later lets the reads of many arrays go out as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stepsafe.format.manifest import ArrayEntry, Chunk, Shard

Box = tuple[tuple[int, int], ...]


@dataclass
class ArrayRead:
    """Boxes of array ``key`` (``outs``), filled by reading each of ``reads`` (chunks, one
    after another, into a C-contiguous buffer) and then making ``copies`` (source, its slices,
    output, the output's slices)."""

    key: str
    outs: dict[Box, np.ndarray]
    reads: list[tuple[tuple[Chunk, ...], np.ndarray]] = field(default_factory=list)
    copies: list[tuple[np.ndarray, tuple[slice, ...], np.ndarray, tuple[slice, ...]]] = field(
        default_factory=list
    )

    def finish(self) -> None:
        """Make the copies, then drop the staging buffers."""
        for src, src_sl, out, dst_sl in self.copies:
            out[dst_sl] = src[src_sl]
        self.copies.clear()
        self.reads.clear()


def plan_array_read(
    key: str, entry: ArrayEntry, boxes: list[Box], shards: Sequence[Shard] | None = None
) -> ArrayRead:
    """How to fill ``boxes`` of array ``key`` from ``shards`` (default: all of its shards; a
    reader passes only those that overlap, ``ArrayEntry.shards_over``)."""
    shards = entry.shards if shards is None else shards
    outs = {box: np.empty(tuple(b - a for a, b in box), entry.dtype) for box in boxes}
    plan = ArrayRead(key, outs)
    if len(boxes) == 1 and len(shards) == 1 and shards[0].index == boxes[0]:
        plan.reads.append((shards[0].chunks, outs[boxes[0]]))  # the common case, quickly
        return plan
    staged: dict[int, tuple[np.ndarray, int, int]] = {}  # shard -> buffer, wanted byte span
    itemsize = entry.dtype.itemsize
    for box, out in outs.items():
        for n, shard in enumerate(shards):
            inter = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(shard.index, box)]
            if any(lo >= hi for lo, hi in inter):
                continue
            dst_sl = tuple(slice(lo - c, hi - c) for (lo, hi), (c, _) in zip(inter, box))
            if tuple(inter) == shard.index:
                dest = out[(*dst_sl, ...)]  # a view, also of a 0-d array
                if dest.flags.c_contiguous:
                    plan.reads.append((shard.chunks, dest))
                    continue
            start, stop = _span(shard, inter, itemsize)
            if n in staged:
                buf, lo, hi = staged[n]
                staged[n] = (buf, min(lo, start), max(hi, stop))
            else:
                staged[n] = (np.empty(shard.shape, entry.dtype), start, stop)
            src_sl = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, shard.index))
            plan.copies.append((staged[n][0], src_sl, out, dst_sl))
    for n, (buf, start, stop) in staged.items():
        plan.reads.append(_chunks_over(shards[n], buf, start, stop))
    return plan


def _span(shard: Shard, inter: list[tuple[int, int]], itemsize: int) -> tuple[int, int]:
    """The bytes of ``shard`` from the first element of the box ``inter`` to its last."""
    shape = shard.shape
    first = [lo - a for (lo, _), (a, _) in zip(inter, shard.index)]
    last = [hi - 1 - a for (_, hi), (a, _) in zip(inter, shard.index)]
    if not shape:
        return 0, itemsize
    flat = lambda idx: int(np.ravel_multi_index(idx, shape))  # noqa: E731
    return flat(first) * itemsize, (flat(last) + 1) * itemsize


def _chunks_over(
    shard: Shard, buf: np.ndarray, start: int, stop: int
) -> tuple[tuple[Chunk, ...], np.ndarray]:
    """The chunks of ``shard`` that hold any of its bytes ``[start, stop)``, and the part of
    ``buf`` (the shard's buffer) they fill."""
    chosen: list[Chunk] = []
    pos = first = 0
    for c in shard.chunks:
        if pos < stop and pos + c.length > start:
            if not chosen:
                first = pos
            chosen.append(c)
        pos += c.length
    end = first + sum(c.length for c in chosen)
    return tuple(chosen), buf.reshape(-1).view(np.uint8)[first:end]
