"""A regular sharding described once: the grid of boxes an array was written in, and who wrote
each box, instead of one entry per shard.

Under many processes a checkpoint of 10,000 arrays, each cut into 1,000 shards, would list 10
million shards in one manifest (1.2 GB of JSON; ~10 minutes to merge on process 0, and every
restoring process reading all of it: see benchmarks/RESULTS-scale.md). But a mesh cuts an array
into a regular grid of equal cells, and the cells a process writes are the same for every array
of that sharding and shape. So a grid is stated once (its cell shape, and the writer of each
cell), and the chunks of each cell live in the part file of the process that wrote it: a
restoring process reads the part files of the writers of the cells it needs, not the job's.

The cell shape follows from the recorded sharding alone (mesh shape, partition spec), with the
replica-parallel rule (``split_axis``): every process computes the same grid, the writers in
``arrays`` compute the same boxes, and the merge only checks that every cell has one writer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Box = tuple[tuple[int, int], ...]


def split_axis(shard: tuple[int, ...], replicas: int, itemsize: int, min_bytes: int) -> int | None:
    """The axis on which the ``replicas`` holders of a ``shard``-shaped box split its writing
    (Orbax's replica-parallel rule: the first axis that ``replicas`` divides), or None when
    one replica writes it whole: a single holder, an empty box, no such axis, or pieces under
    ``min_bytes``."""
    if replicas <= 1 or 0 in shard:
        return None
    if math.prod(shard) // replicas * itemsize < min_bytes:
        return None
    return next((i for i, n in enumerate(shard) if n % replicas == 0), None)


def cell_shape(
    sharding: dict[str, Any], shape: tuple[int, ...], itemsize: int, min_bytes: int
) -> tuple[int, ...] | None:
    """The shape of the boxes an array of ``shape`` is written in under the recorded
    ``sharding`` (``{"mesh": {"axis_names", "shape"}, "spec"}``); None when the sharding does
    not cut it into equal boxes (an axis its mesh axes do not divide)."""
    sizes = dict(zip(sharding["mesh"]["axis_names"], sharding["mesh"]["shape"]))
    spec = list(sharding["spec"]) + [None] * (len(shape) - len(sharding["spec"]))
    if len(spec) != len(shape) or 0 in shape:
        return None
    shard, used = [], 1
    for n, entry in zip(shape, spec):
        names = [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
        parts = math.prod(sizes[a] for a in names)
        if parts == 0 or n % parts:
            return None
        shard.append(n // parts)
        used *= parts
    replicas = math.prod(sizes.values()) // used
    axis = split_axis(tuple(shard), replicas, itemsize, min_bytes)
    if axis is not None:
        shard[axis] //= replicas
    return tuple(shard)


@dataclass(frozen=True)
class Grid:
    """An array's boxes: cells of shape ``cell`` (``counts`` per axis, C order), cell ``i``
    written by process ``writers[i]``."""

    cell: tuple[int, ...]
    writers: tuple[int, ...]

    def counts(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Cells per axis (a grid is only made for arrays with no empty axis)."""
        return tuple(n // c for n, c in zip(shape, self.cell))

    def box(self, i: int, shape: tuple[int, ...]) -> Box:
        """Cell ``i``'s box in an array of ``shape``."""
        out = []
        for c, k in zip(reversed(self.cell), reversed(self.counts(shape))):
            i, at = divmod(i, k)
            out.append((at * c, (at + 1) * c))
        return tuple(reversed(out))

    def cells_of(self, process: int) -> list[int]:
        """The cells ``process`` wrote, in C order."""
        return [i for i, w in enumerate(self.writers) if w == process]

    def index(self, box: Box, shape: tuple[int, ...]) -> int | None:
        """The cell whose box is ``box``, or None when ``box`` is no cell."""
        i = 0
        for (lo, hi), c, k in zip(box, self.cell, self.counts(shape)):
            if lo % c or hi - lo != c:
                return None
            i = i * k + lo // c
        return i

    def cells_over(self, box: Box, shape: tuple[int, ...]) -> list[int]:
        """The cells that overlap ``box``, in C order."""
        ranges = [range(lo // c, -(-hi // c)) for (lo, hi), c in zip(box, self.cell)]
        counts = self.counts(shape)
        cells = [0]
        for r, k in zip(ranges, counts):
            cells = [i * k + j for i in cells for j in r]
        return cells


def fits(cell: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether cells of shape ``cell`` tile an array of ``shape`` (no empty axis) exactly."""
    return len(cell) == len(shape) and all(c > 0 and n % c == 0 for c, n in zip(cell, shape))
