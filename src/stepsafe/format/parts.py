"""Part files: each process's chunk table for the grid cells it wrote, read only when needed.

In a checkpoint saved by many processes (format version 2), an array cut into a regular grid
(``grid.py``) lists no shards in the manifest: the chunks of each cell are in the part file
``items/part_<p>.<id>.json`` of the process ``p`` that wrote it, and the manifest lists every
part's size and checksum. A reader loads a part the first time it needs one of its cells, checks
it against the manifest (size, checksum, exactly the cells the grid gives that process, chunks
inside listed data files and as long as their cells), and keeps it for the next arrays.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

from stepsafe.errors import ChecksumMismatchError, CorruptCheckpointError, ManifestError
from stepsafe.format.checksum import checksum
from stepsafe.format.grid import Grid
from stepsafe.format.manifest import MAX_CHUNK, Chunk, Shard

PART_MAX_BYTES = 1 << 30  # as a manifest: a part is untrusted input, refused unread beyond it


def part_json(cells: dict[str, list[tuple[int, tuple[Chunk, ...]]]]) -> bytes:
    """A part file's bytes: per array, each cell this process wrote and its chunks."""
    return json.dumps(
        {
            "arrays": {
                key: [[cell, [[c.file, c.offset, c.length, c.checksum] for c in chunks]]
                      for cell, chunks in rows]
                for key, rows in cells.items()
            }
        },
        separators=(",", ":"),
    ).encode()  # fmt: skip


class PartLoader:
    """The parts of one checkpoint, loaded on first use and checked (thread-safe: a restore
    plans from one thread, ``verify`` from several)."""

    def __init__(
        self,
        parts: list[tuple[str, int, str] | None],
        files: dict[str, int],
        arrays: dict[str, tuple[Grid, tuple[int, ...], int]],
        used: dict[str, int] | None = None,
    ) -> None:
        """``parts``: per process (name, size, checksum), None for one that wrote no cell;
        ``arrays``: per grid array its grid, shape and item size; ``used``: per data file the
        bytes that the manifest's own shards claim in it."""
        self.parts, self.files, self.arrays = parts, files, arrays
        self.used = used or {}
        self.read: Callable[[str, int], bytes] | None = None  # bound by the reader
        self._loaded: dict[int, Any] = {}  # a part's tables, or the error it gave once
        self._lock = threading.Lock()

    def shards(self, key: str, cells: Sequence[int]) -> tuple[Shard, ...]:
        """The shards of cells ``cells`` of array ``key``, from their writers' parts.

        Raises:
            ManifestError, ChecksumMismatchError, TruncatedDataError: a part is missing or
                does not match the manifest.
        """
        grid, shape, _ = self.arrays[key]
        return tuple(Shard(grid.box(c, shape), self._part(grid.writers[c])[key][c]) for c in cells)

    def _part(self, process: int) -> dict[str, dict[int, tuple[Chunk, ...]]]:
        with self._lock:
            got = self._loaded.get(process)
            if got is None:
                try:
                    got = self._load(process)
                except CorruptCheckpointError as e:
                    got = e  # a damaged part is read once, not once per array on its grid
                self._loaded[process] = got
            if isinstance(got, CorruptCheckpointError):
                raise got
            return got

    def _load(self, process: int) -> dict[str, dict[int, tuple[Chunk, ...]]]:
        entry = self.parts[process]
        if entry is None or self.read is None:
            raise ManifestError(f"process {process} wrote cells but its part is not listed")
        name, size, digest = entry
        raw = self.read(name, min(size, PART_MAX_BYTES))
        if len(raw) != size or checksum(raw) != digest:
            raise ChecksumMismatchError(
                f"part file {name} does not match the manifest's size and checksum: the "
                "checkpoint is corrupt; restore an earlier step"
            )
        try:
            doc = json.loads(raw)
            return self._check(process, name, doc["arrays"])
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise ManifestError(f"part file {name} is malformed ({type(e).__name__}: {e})") from e

    def _check(self, process: int, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        """The part's tables, refused unless they hold exactly the cells the grid gives this
        process, each as many bytes as its box, in chunks inside the listed data files."""
        out: dict[str, dict[int, tuple[Chunk, ...]]] = {}
        used: dict[str, int] = {}
        mine: dict[int, list[int]] = {}  # per grid (arrays share them): this process's cells
        for key, (grid, _, itemsize) in self.arrays.items():
            want = mine.get(id(grid))
            if want is None:
                want = mine[id(grid)] = grid.cells_of(process)
            rows = doc.get(key, [])
            if not want and not rows:
                continue
            if [row[0] for row in rows] != want:
                raise ManifestError(
                    f"part file {name}: array {key!r} lists cells that the grid does not give "
                    f"process {process}: the checkpoint is corrupt"
                )
            cell_bytes = itemsize
            for c in grid.cell:
                cell_bytes *= c
            table = {}
            for cell, chunks in rows:
                parsed = tuple(self._chunk(name, key, row, used, process) for row in chunks)
                if sum(c.length for c in parsed) != cell_bytes:
                    raise ManifestError(
                        f"part file {name}: array {key!r} cell {cell} holds a wrong byte count"
                    )
                table[cell] = parsed
            out[key] = table
        if set(doc) - set(self.arrays):
            raise ManifestError(f"part file {name} lists arrays that are not in the grid")
        for file, n in used.items():
            if n + self.used.get(file, 0) > self.files[file]:
                raise ManifestError(f"part file {name}: chunks claim {n} bytes of {file}")
        return out

    def _chunk(self, name: str, key: str, row: list, used: dict[str, int], process: int) -> Chunk:
        file, offset, length, digest = row
        size = self.files.get(file)
        if size is None:
            raise ManifestError(f"part file {name}: array {key!r} points at unlisted {file!r}")
        if not file.startswith(f"process_{process}."):  # bytes of one file, one part's
            raise ManifestError(
                f"part file {name}: array {key!r} points at {file}, which another process wrote"
            )
        if type(offset) is not int or type(length) is not int or type(digest) is not str:
            raise ManifestError(f"part file {name}: array {key!r}: malformed chunk {row[:3]}")
        if offset < 0 or length < 0 or offset + length > size or length > MAX_CHUNK:
            raise ManifestError(f"part file {name}: array {key!r}: chunk beyond {file}")
        used[file] = used.get(file, 0) + length
        return Chunk(file, offset, length, digest)


class LazyShards(Sequence[Shard]):
    """An array's shards as a sequence, loaded from the parts on first use (whole-checkpoint
    tools: verify, diff); a restore asks ``over`` for only the cells it needs."""

    def __init__(self, loader: PartLoader, key: str, count: int) -> None:
        self.loader, self.key, self.count = loader, key, count
        self._all: tuple[Shard, ...] | None = None

    def over(self, cells: Sequence[int]) -> tuple[Shard, ...]:
        return self.loader.shards(self.key, cells)

    def _shards(self) -> tuple[Shard, ...]:
        if self._all is None:
            self._all = self.loader.shards(self.key, range(self.count))
        return self._all

    def __len__(self) -> int:
        return self.count

    @overload
    def __getitem__(self, i: int) -> Shard: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[Shard, ...]: ...
    def __getitem__(self, i: int | slice) -> Shard | tuple[Shard, ...]:
        return self._shards()[i]

    def __iter__(self) -> Iterator[Shard]:
        return iter(self._shards())
