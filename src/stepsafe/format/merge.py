"""Merge what every process wrote into one manifest, and refuse one that misses any byte.

A manifest is committed only if it covers every array exactly: each shard inside its array and
holding as many bytes as its box, the shards of all processes tiling the array with no gap or
overlap, and no data file written twice. Without this a save that holds only part of an array
(another process's shards missing, a stream cut short) would commit, and restore would hand
back memory that was never saved. One process merges its own part; under many processes,
process 0 merges every process's part, before it commits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from stepsafe.errors import ManifestError
from stepsafe.format.dtypes import dtype_to_str
from stepsafe.format.layout import is_data_file_of
from stepsafe.format.manifest import (
    ArrayEntry,
    Manifest,
    Shard,
    check_exact_cover,
    parse_sharding,
)
from stepsafe.format.plan import HostArray, check_box
from stepsafe.format.written import WrittenPart
from stepsafe.tree import Structure

_REFUSED = "nothing was committed"


def merge_parts(
    structure: Structure,
    arrays: Sequence[HostArray],
    values: dict[str, Any],
    parts: Sequence[WrittenPart],
    save_id: str,
) -> Manifest:
    """The manifest of ``structure``: ``arrays`` (only their key, dtype, shape and sharding
    are used) with the shards of every part (in part order), the inline ``values``, and every
    part's data files.

    Raises:
        ManifestError: a data file in two parts, or not named for its process and
            ``save_id``; a shard of an array not in ``arrays``,
            outside its shape or not holding its box's bytes; an array whose shards leave
            gaps or overlap; a sharding record that readers would refuse.
    """
    files: dict[str, int] = {}
    shards: dict[str, list[Shard]] = {a.path: [] for a in arrays}
    for process, part in enumerate(parts):
        for name, size in part.files.items():
            if not is_data_file_of(name, process, save_id):
                raise ManifestError(
                    f"process {process} says it wrote {name!r}, which is not one of its data "
                    f"files in save {save_id}: {_REFUSED}"
                )
            if name in files:
                raise ManifestError(f"data file {name} was written twice: {_REFUSED}")
            files[name] = size
        for key, mine in part.shards.items():
            if key not in shards:
                raise ManifestError(f"array {key!r} was written but is not in the tree: {_REFUSED}")
            if any(c.file not in part.files for s in mine for c in s.chunks):
                raise ManifestError(
                    f"array {key!r}: process {process} points at a data file it did not "
                    f"write: {_REFUSED}"
                )
            shards[key].extend(mine)
    entries = {}
    for a in arrays:
        dtype = np.dtype(a.dtype)
        shape = tuple(a.shape)
        if a.sharding is not None:
            try:
                parse_sharding(a.path, a.sharding, len(shape))
            except ManifestError as e:
                raise ManifestError(f"{e}: {_REFUSED}") from None
        _check_shards(a.path, shape, dtype, shards[a.path])
        entries[a.path] = ArrayEntry(
            dtype, dtype_to_str(a.dtype, a.path), shape, tuple(shards[a.path]), a.sharding
        )
    return Manifest(structure, entries, values, files)


def _check_shards(key: str, shape: tuple[int, ...], dtype: np.dtype, shards: list[Shard]) -> None:
    """Every shard inside the array and as long as its box; together, an exact cover."""
    whole = len(shards) == 1 and shards[0].index == tuple((0, n) for n in shape)
    for s in shards:
        if not whole:
            check_box(key, shape, s.index)
        want = math.prod(hi - lo for lo, hi in s.index) * dtype.itemsize
        have = sum(c.length for c in s.chunks)
        if have != want:
            raise ManifestError(
                f"array {key!r}: shard {s.index} was written with {have} bytes, its box "
                f"holds {want}: {_REFUSED}"
            )
    if whole:
        return  # the common case, quickly: one shard, the whole array
    try:
        check_exact_cover(key, shape, shards)
    except ManifestError as e:
        raise ManifestError(f"{e}: {_REFUSED}") from None
