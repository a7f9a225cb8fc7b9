"""Plan one process's data files: which byte ranges of which shards go where, before any write.

Every shard's bytes are cut into pieces (at most ``knobs.CHUNK_BYTES`` each, the checksum
granularity) packed one after another into data files, each piece starting on an ``ALIGN``
boundary; a file is closed once it reaches the target size. Pieces are views of the caller's
memory: planning copies nothing. A shard may also be made on demand (``LazyShard``: a
conversion's output leaf): its pieces then hold only their byte range, read from it when the
file is written, so that a whole model need never be in memory at once. Each piece has a
number, by which the record of what was written (``written.py``) names it, so that the
manifest can be built from that record alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stepsafe import knobs
from stepsafe.errors import ManifestError
from stepsafe.format.layout import data_file_name
from stepsafe.format.manifest import MAX_CHUNK, Box

ALIGN = 64


@dataclass
class HostArray:
    """An array ready to write: its global description and its shards. A shard is a host
    array, or anything ``np.asarray`` turns into one (a device copy awaiting its transfer).
    ``sharding``: how the array was laid out on devices (a JAX NamedSharding's mesh and spec,
    see ``manifest.parse_sharding``), recorded in the manifest; None for host arrays.
    ``devices``: the ids of the mesh's devices in mesh order (not recorded: the same mesh shape
    on other devices writes other cells, so it names another grid; ``grid_parts.grid_key``)."""

    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    shards: list[tuple[Box, Any]]
    sharding: dict | None = None
    devices: tuple[int, ...] | None = None


class LazyShard:
    """A shard whose bytes are made only when they are written: ``nbytes`` long, bytes
    ``[start, stop)`` from ``bytes_at`` (C order). Subclasses decide how (and for how long) they
    hold what they made."""

    nbytes: int

    def bytes_at(self, start: int, stop: int) -> memoryview:
        raise NotImplementedError


@dataclass(slots=True)
class Piece:
    """Bytes ``[start, start + size)`` of a shard of array ``key``, to be written at ``offset``
    of its file: a view of the caller's memory (``view``), or of a ``LazyShard`` (``lazy``),
    made when the file is written; ``id`` is its number in the plan."""

    id: int
    key: str
    offset: int
    size: int
    view: memoryview | None = None
    lazy: LazyShard | None = None
    start: int = 0

    def data(self) -> memoryview:
        """The piece's bytes (a lazy shard's are made now)."""
        if self.view is not None:
            return self.view
        assert self.lazy is not None
        return self.lazy.bytes_at(self.start, self.start + self.size)


@dataclass
class FilePlan:
    """One data file: its name, its pieces in file order, its size (the end of its last)."""

    name: str
    pieces: list[Piece] = field(default_factory=list)
    size: int = 0


@dataclass(slots=True)
class PlannedShard:
    """Shard ``index`` of array ``key`` is pieces ``pieces`` (their ids, in byte order)."""

    key: str
    index: Box
    pieces: range


@dataclass
class WritePlan:
    """Everything one process writes: its data files, and per shard which pieces hold it;
    pieces are numbered 0 to ``num_pieces - 1``."""

    files: list[FilePlan]
    shards: list[PlannedShard]
    num_pieces: int


def plan_files(
    arrays: list[HostArray], file_size: int, process_index: int, save_id: str
) -> WritePlan:
    """Pack the shards of ``arrays``, in order, into data files of about ``file_size`` bytes
    named for ``process_index`` and ``save_id``. Each shard is made a host array here (a
    device copy's transfer is waited for), so the plan is ready to stream.

    Raises:
        ManifestError: a shard outside its array's shape, or whose bytes do not fill its box
            (nothing is written then).
    """
    chunk = min(knobs.CHUNK_BYTES, MAX_CHUNK)  # once: this loops per piece
    files = [FilePlan(data_file_name(process_index, 0, save_id))]
    shards: list[PlannedShard] = []
    next_id = 0
    for arr in arrays:
        for index, data in arr.shards:
            check_box(arr.path, arr.shape, index)
            lazy = data if isinstance(data, LazyShard) else None
            view = None if lazy is not None else _as_bytes(data)
            nbytes = lazy.nbytes if lazy is not None else len(view)  # type: ignore[arg-type]
            expected = math.prod(hi - lo for lo, hi in index) * np.dtype(arr.dtype).itemsize
            if nbytes != expected:
                raise ManifestError(
                    f"array {arr.path!r}: shard {index} holds {nbytes} bytes, its box "
                    f"{expected}: nothing was committed"
                )
            first = next_id
            pos = 0
            while pos < nbytes:
                f = files[-1]
                start = -(-f.size // ALIGN) * ALIGN
                room = file_size - start
                if room <= 0 and f.size > 0:
                    files.append(FilePlan(data_file_name(process_index, len(files), save_id)))
                    continue
                n = min(nbytes - pos, chunk, max(room, 1))
                if view is not None:
                    f.pieces.append(Piece(next_id, arr.path, start, n, view[pos : pos + n]))
                else:
                    f.pieces.append(Piece(next_id, arr.path, start, n, lazy=lazy, start=pos))
                next_id += 1
                f.size = start + n
                pos += n
            shards.append(PlannedShard(arr.path, tuple(map(tuple, index)), range(first, next_id)))
    return WritePlan([f for f in files if f.size > 0], shards, next_id)


def check_box(key: str, shape: tuple[int, ...], index: Box) -> None:
    """Refuse a shard box that does not lie inside its array's shape.

    Raises:
        ManifestError: naming the array, the box and the shape.
    """
    if len(index) != len(shape) or any(not 0 <= lo <= hi <= n for (lo, hi), n in zip(index, shape)):
        raise ManifestError(
            f"array {key!r}: shard {index} lies outside its shape {shape}: nothing was committed"
        )


def _as_bytes(a: Any) -> memoryview:
    return memoryview(np.ascontiguousarray(np.asarray(a)).reshape(-1).view(np.uint8))
