"""Write one process's planned data files and return the record of what was written.

The record (a ``WrittenPart``) is the only source of the manifest's chunks: a data file's
writer returns what it wrote (its name, its size, each piece's chunk with its checksum) only
once the storage read its stream to the end, and the part is assembled from those records and
the plan, checking that every planned piece was written exactly once. A storage that stops
reading a stream early therefore fails the save instead of committing a manifest that points
at bytes that were never written.

Bytes go from the caller's buffers straight to ``write(2)`` (no copy); each piece's checksum
is taken just before it is handed over, while its bytes are hot in cache; runs of small pieces
are gathered into one buffer (one syscall instead of hundreds).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from stepsafe import knobs
from stepsafe.errors import ManifestError
from stepsafe.format.checksum import checksum
from stepsafe.format.layout import ITEMS_DIR
from stepsafe.format.manifest import Chunk, Shard
from stepsafe.format.plan import FilePlan, WritePlan
from stepsafe.storage import Transaction, run_all


@dataclass
class WrittenFile:
    """One data file as it was written: ``chunks`` holds (piece id, its chunk) in file order."""

    name: str
    size: int
    chunks: list[tuple[int, Chunk]]


@dataclass
class WrittenPart:
    """What one process wrote: its data files (name -> size, in order), per array the shards
    it holds (each a box and its chunks), and its extra files (name -> checksum). Process 0
    merges every process's part into the manifest (``merge.merge_parts``); under many
    processes each part travels to process 0 as JSON."""

    files: dict[str, int] = field(default_factory=dict)
    shards: dict[str, list[Shard]] = field(default_factory=dict)
    extra_files: dict[str, str] = field(default_factory=dict)
    # Version 2 (many processes): the part file (name, size, checksum) holding the chunks of
    # the grid arrays' cells, and per grid the cells this process wrote (grid_parts.py).
    part_file: list | None = None
    cells: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "files": self.files,
                "shards": {
                    k: [
                        [[list(r) for r in s.index], [list(_chunk_row(c)) for c in s.chunks]]
                        for s in shards
                    ]
                    for k, shards in self.shards.items()
                },
                "extra_files": self.extra_files,
                "part_file": self.part_file,
                "cells": self.cells,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> WrittenPart:
        """The part another process sent; only its form is checked here (``merge_parts``
        checks what it claims against the tree and the other parts).

        Raises:
            ManifestError: not a part's JSON.
        """
        try:
            doc = json.loads(raw)
            return cls(
                files={str(n): int(size) for n, size in doc["files"].items()},
                shards={
                    str(k): [
                        Shard(
                            tuple((int(lo), int(hi)) for lo, hi in index),
                            tuple(Chunk(str(f), int(o), int(n), str(c)) for f, o, n, c in chunks),
                        )
                        for index, chunks in shards
                    ]
                    for k, shards in doc["shards"].items()
                },
                extra_files={str(n): str(c) for n, c in doc["extra_files"].items()},
                part_file=_part_file(doc.get("part_file")),
                cells={str(g): [int(c) for c in cells] for g, cells in doc["cells"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"the part {where} sent is malformed ({e})") from e


def _part_file(entry: object) -> list | None:
    if entry is None:
        return None
    name, size, digest = entry  # type: ignore[misc]
    return [str(name), int(size), str(digest)]


def _chunk_row(c: Chunk) -> tuple[str, int, int, str]:
    return (c.file, c.offset, c.length, c.checksum)


def write_files(txn: Transaction, plan: WritePlan) -> WrittenPart:
    """Write every data file of ``plan`` into ``txn`` (files in parallel on the I/O threads)
    and return what was written.

    Raises:
        ManifestError: a file's stream was not read to its end, or a planned piece was not
            written exactly once; nothing is committed then.
        StorageError: as the storage raised it.
    """
    if any(p.lazy is not None for f in plan.files for p in f.pieces):
        # Made on demand (a conversion): one file at a time, in order, so that a shard split
        # across two files is made once and never waits on a file that waits on it.
        written = [_write_file(txn, f) for f in plan.files]
    else:
        written = run_all(lambda f: _write_file(txn, f), plan.files)
    found: list[Chunk | None] = [None] * plan.num_pieces
    for w in written:
        for piece, chunk in w.chunks:
            if found[piece] is not None:
                raise ManifestError(f"piece {piece} was written twice: nothing was committed")
            found[piece] = chunk
    part = WrittenPart({w.name: w.size for w in written})
    complete = sum(len(w.chunks) for w in written) == len(found)  # none twice: each once
    for s in plan.shards:
        chunks = tuple(found[s.pieces.start : s.pieces.stop])
        if not complete and any(c is None for c in chunks):
            raise ManifestError(
                f"array {s.key!r}: shard {s.index} was not written in full: nothing was committed"
            )
        part.shards.setdefault(s.key, []).append(Shard(s.index, chunks))  # type: ignore[arg-type]
    return part


def _write_file(txn: Transaction, f: FilePlan) -> WrittenFile:
    """Stream ``f`` into ``txn``; its record only if the storage read the stream to its end."""
    record = WrittenFile(f.name, -1, [])

    def stream() -> Iterator[memoryview | bytes]:
        """The file's bytes in order: big pieces as views of the caller's memory (no copy),
        runs of small pieces and padding gathered into one buffer."""
        gather = knobs.GATHER_BYTES
        pos = 0
        small = bytearray()
        for p in f.pieces:
            view = p.data()
            if len(view) != p.size:
                raise ManifestError(
                    f"array {p.key!r}: a piece of {p.size} bytes came out {len(view)} bytes "
                    "long: nothing was committed"
                )
            record.chunks.append((p.id, Chunk(f.name, p.offset, p.size, checksum(view))))
            if p.size >= gather:
                if small:
                    yield bytes(small)
                    small.clear()
                if p.offset > pos:
                    yield bytes(p.offset - pos)
                yield view
            else:
                small += bytes(p.offset - pos)
                small += view
                if len(small) >= gather:
                    yield bytes(small)
                    small.clear()
            pos = p.offset + p.size
            del view  # an array made on demand goes before the next one is made
        if small:
            yield bytes(small)
        record.size = pos  # reached only once every byte was handed over

    txn.write_file(f"{ITEMS_DIR}/{f.name}", stream())
    if record.size != f.size:
        keys = list(dict.fromkeys(p.key for p in f.pieces))
        names = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
        raise ManifestError(
            f"array{'s' if len(keys) > 1 else ''} {names} {'were' if len(keys) > 1 else 'was'} "
            f"not written in full: the storage stopped reading data file {f.name} early; "
            "nothing was committed"
        )
    return record
