"""Write one checkpoint: pack shard bytes into data files, checksum them, commit.

Bytes go from the caller's host buffers straight to ``write(2)`` (no copy); each chunk's
checksum is taken just before its bytes are written, while they are hot in cache. Data files are
split at a target size so that big states spread over files that can be written and read in
parallel. The manifest, any extra files, and ``_CHECKPOINT_METADATA`` follow the data, the
metadata last, and only then does the transaction commit.

A manifest is committed only if it covers every array exactly: each shard inside its array and
holding as many bytes as its box, the shards tiling the array with no gap or overlap, and every
chunk written. Without this a save that holds only part of an array (another process's shards,
a stream cut short) would commit, and restore would hand back memory that was never saved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stepsafe.errors import ManifestError
from stepsafe.format.checksum import checksum
from stepsafe.format.dtypes import dtype_to_str
from stepsafe.format.layout import (
    ITEMS_DIR,
    METADATA_FILE,
    CheckpointMetadata,
    check_extra_name,
    data_file_name,
)
from stepsafe.format.manifest import (
    MAX_CHUNK,
    ArrayEntry,
    Chunk,
    Manifest,
    Shard,
    check_exact_cover,
)
from stepsafe.storage import Storage, run_all
from stepsafe.tree import Structure

ALIGN = 64
_GATHER = 1 << 20  # pieces smaller than this are copied together into one write


@dataclass
class HostArray:
    """An array ready to write: its global description and its shards. A shard is a host
    array, or anything ``np.asarray`` turns into one (a device copy awaiting its transfer)."""

    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    shards: list[tuple[tuple[tuple[int, int], ...], Any]]


@dataclass
class _Piece:
    offset: int
    view: memoryview
    slot: list  # where the Chunk for this piece goes once its checksum is known
    slot_index: int


@dataclass
class _File:
    name: str
    pieces: list[_Piece] = field(default_factory=list)
    size: int = 0


def _as_bytes(a: Any) -> memoryview:
    return memoryview(np.ascontiguousarray(np.asarray(a)).reshape(-1).view(np.uint8))


def _plan(
    arrays: list[HostArray], file_size: int, process_index: int, save_id: str
) -> tuple[list[_File], dict[str, list[tuple[tuple, list]]]]:
    files = [_File(data_file_name(process_index, 0, save_id))]
    slots: dict[str, list[tuple[tuple, list]]] = {}
    for arr in arrays:
        _check_cover(arr)
        for index, data in arr.shards:
            view = _as_bytes(data)
            expected = math.prod(hi - lo for lo, hi in index) * np.dtype(arr.dtype).itemsize
            if len(view) != expected:
                raise ManifestError(
                    f"array {arr.path!r}: shard {index} holds {len(view)} bytes, its box "
                    f"{expected}: nothing was committed"
                )
            chunks: list = []
            slots.setdefault(arr.path, []).append((index, chunks))
            pos = 0
            while pos < len(view):
                f = files[-1]
                start = -(-f.size // ALIGN) * ALIGN
                room = file_size - start
                if room <= 0 and f.size > 0:
                    files.append(_File(data_file_name(process_index, len(files), save_id)))
                    continue
                n = min(len(view) - pos, MAX_CHUNK, max(room, 1))
                chunks.append(None)
                f.pieces.append(_Piece(start, view[pos : pos + n], chunks, len(chunks) - 1))
                f.size = start + n
                pos += n
    return [f for f in files if f.size > 0], slots


def _check_cover(arr: HostArray) -> None:
    """Refuse an array whose shards do not tile it exactly (see the module's docstring)."""
    for index, _ in arr.shards:
        if len(index) != len(arr.shape) or any(
            not 0 <= lo <= hi <= n for (lo, hi), n in zip(index, arr.shape)
        ):
            raise ManifestError(
                f"array {arr.path!r}: shard {index} lies outside its shape {arr.shape}: "
                "nothing was committed"
            )
    full = tuple((0, n) for n in arr.shape)
    if len(arr.shards) != 1 or arr.shards[0][0] != full:
        try:
            check_exact_cover(arr.path, arr.shape, [Shard(i, ()) for i, _ in arr.shards])
        except ManifestError as e:
            raise ManifestError(f"{e}: nothing was committed") from None


def _check_written(slots: dict[str, list[tuple[tuple, list]]]) -> None:
    """Every chunk's entry is filled in as its bytes are streamed to storage: one still empty
    means a data file was not written in full, and the manifest would point at missing bytes."""
    for key, shards in slots.items():
        for index, chunks in shards:
            if any(c is None for c in chunks):
                raise ManifestError(
                    f"array {key!r}: shard {index} was not written in full: nothing was committed"
                )


def _stream(f: _File) -> Iterator[memoryview | bytes]:
    """The file's bytes in order: big pieces as views of the caller's memory (no copy), runs
    of small pieces and padding gathered into one buffer (one syscall instead of hundreds)."""
    pos = 0
    small = bytearray()
    for p in f.pieces:
        p.slot[p.slot_index] = Chunk(f.name, p.offset, len(p.view), checksum(p.view))
        if len(p.view) >= _GATHER:
            if small:
                yield bytes(small)
                small.clear()
            if p.offset > pos:
                yield bytes(p.offset - pos)
            yield p.view
        else:
            small += bytes(p.offset - pos)
            small += p.view
            if len(small) >= _GATHER:
                yield bytes(small)
                small.clear()
        pos = p.offset + len(p.view)
    if small:
        yield bytes(small)


def write_checkpoint(
    storage: Storage,
    path: str,
    structure: Structure,
    arrays: list[HostArray],
    values: dict[str, Any],
    *,
    metadata: CheckpointMetadata,
    extra_files: dict[str, bytes] | None = None,
    file_size: int | None = None,
    process_index: int = 0,
) -> Manifest:
    """``file_size``: where data files are split; None for the storage's default (big files
    on a local disk, smaller ones on buckets, where each goes up in one request)."""
    file_size = storage.default_file_size if file_size is None else file_size
    if file_size < ALIGN:
        raise ValueError(f"data file size must be at least {ALIGN} bytes, got {file_size}")
    files, slots = _plan(arrays, file_size, process_index, metadata.save_id)
    with storage.transaction(path) as txn:
        run_all(lambda f: txn.write_file(f"{ITEMS_DIR}/{f.name}", _stream(f)), files)
        _check_written(slots)
        manifest = Manifest(
            structure,
            {
                a.path: ArrayEntry(
                    np.dtype(a.dtype),
                    dtype_to_str(a.dtype, a.path),
                    tuple(a.shape),
                    tuple(Shard(index, tuple(chunks)) for index, chunks in slots.get(a.path, [])),
                )
                for a in arrays
            },
            values,
            {f.name: f.size for f in files},
        )
        raw = manifest.to_json()
        txn.write_file(metadata.manifest_path, [raw])
        for name, content in (extra_files or {}).items():
            check_extra_name(name, "extra_files")
            txn.write_file(metadata.extra_path(name), [content])
            metadata.extra_files[name] = checksum(content)
        metadata.manifest_checksum = checksum(raw)
        metadata.commit_timestamp_nsecs = time.time_ns()
        txn.write_file(METADATA_FILE, [metadata.to_json()])
        txn.commit()
    return manifest
