"""Write and merge a checkpoint of many processes as grids and part files (format version 2).

Each process takes the shards of its arrays that lie on a regular grid (``grid.py``) out of its
part, writes their chunk table to its own part file, and tells process 0 only which cells of
each grid it wrote (one list per distinct sharding and shape, not per array). Process 0 gives
every cell exactly one writer, or refuses: the cover is checked per grid, in time that grows
with the cells of the distinct shardings, not with arrays x processes. Arrays off any grid
(host arrays, other shardings, 0-d arrays) keep their shards in the manifest, merged as in
version 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from stepsafe import knobs
from stepsafe.errors import ManifestError
from stepsafe.format.checksum import ALGORITHM, checksum
from stepsafe.format.dtypes import dtype_to_str
from stepsafe.format.grid import Grid, cell_shape
from stepsafe.format.layout import ITEMS_DIR, part_file_name
from stepsafe.format.manifest import FORMAT, GRID_VERSION, MANIFEST_MAX_BYTES, array_json
from stepsafe.format.merge import merge_parts
from stepsafe.format.parts import part_json
from stepsafe.format.plan import HostArray
from stepsafe.format.written import WrittenPart
from stepsafe.storage import Transaction
from stepsafe.tree import Structure

_REFUSED = "nothing was committed"


def grid_key(a: HostArray, min_bytes: int) -> tuple[str, tuple[int, ...]] | None:
    """The grid ``a`` is written on: (a name every process gives it alike, its cell shape);
    None for an array off any grid. The name holds the sharding record, the shape, the item
    size and the mesh's devices: arrays share a grid only when the same processes write the
    same cells of them."""
    if a.sharding is None or not a.shape or 0 in a.shape:
        return None
    cell = cell_shape(a.sharding, tuple(a.shape), np.dtype(a.dtype).itemsize, min_bytes)
    if cell is None:
        return None
    devices = checksum(json.dumps(a.devices).encode())  # another device order: other cells
    name = json.dumps(
        [a.sharding, list(a.shape), np.dtype(a.dtype).itemsize, devices], sort_keys=True
    )
    return name, cell


def write_cells(
    txn: Transaction, part: WrittenPart, arrays: Sequence[HostArray], process: int, save_id: str
) -> None:
    """Move the grid arrays' shards of ``part`` into this process's part file (written into
    ``txn``), and record in ``part`` the file and the cells it wrote of each grid.

    Raises:
        ManifestError: a shard that is not a cell of its array's grid (the writers and the
            grid disagree: nothing is committed).
    """
    min_bytes = knobs.REPLICA_SLICE_MIN_BYTES  # once: every process reads it alike
    tables: dict[str, list] = {}
    for a in arrays:
        key = grid_key(a, min_bytes)
        if key is None:
            continue
        name, cell = key
        grid = Grid(cell, ())
        rows = []
        for s in part.shards.pop(a.path, []):
            i = grid.index(s.index, tuple(a.shape))
            if i is None:
                raise ManifestError(
                    f"array {a.path!r}: box {s.index} is not a cell {cell} of its grid: {_REFUSED}"
                )
            rows.append((i, s.chunks))
        rows.sort(key=lambda r: r[0])
        cells = [i for i, _ in rows]
        if part.cells.setdefault(name, cells) != cells:
            raise ManifestError(
                f"array {a.path!r}: process {process} wrote other cells of it than of arrays "
                f"with the same sharding and shape: {_REFUSED}"
            )
        if rows:
            tables[a.path] = rows
    if tables:
        raw = part_json(tables)
        name = part_file_name(process, save_id)
        txn.write_file(f"{ITEMS_DIR}/{name}", [raw])
        part.part_file = [name, len(raw), checksum(raw)]


def merge_grid_parts(
    structure: Structure,
    arrays: Sequence[HostArray],
    values: dict[str, Any],
    parts: Sequence[WrittenPart],
    save_id: str,
) -> bytes:
    """The version-2 manifest of every process's part: one writer for every cell of every
    grid, the arrays off any grid merged as in version 1.

    Raises:
        ManifestError: a cell written twice or never, a grid no array has, or what
            ``merge_parts`` refuses.
    """
    min_bytes = knobs.REPLICA_SLICE_MIN_BYTES
    on_grid: dict[str, str] = {}
    grids: dict[str, tuple[tuple[int, ...], list[int]]] = {}
    for a in arrays:
        key = grid_key(a, min_bytes)
        if key is not None:
            name, cell = key
            on_grid[a.path] = name
            count = math.prod(n // c for n, c in zip(a.shape, cell))
            grids.setdefault(name, (cell, [-1] * count))
    for p, part in enumerate(parts):
        for name, cells in part.cells.items():
            if name not in grids:
                raise ManifestError(f"process {p} wrote cells of a grid no array has: {_REFUSED}")
            writers = grids[name][1]
            for c in cells:
                if not 0 <= c < len(writers) or writers[c] != -1:
                    raise ManifestError(
                        f"cell {c} of a grid was written twice or lies outside it: {_REFUSED}"
                    )
                writers[c] = p
    for name, (_, writers) in grids.items():
        if -1 in writers:
            keys = [k for k, g in on_grid.items() if g == name][:3]
            raise ManifestError(
                f"array {keys[0]!r}{' and others' if len(keys) > 1 else ''}: its shards leave "
                f"gaps in the array (cell {writers.index(-1)} has no writer): {_REFUSED}"
            )
    inline = [a for a in arrays if a.path not in on_grid]
    manifest = merge_parts(structure, inline, values, parts, save_id)
    number = {name: n for n, name in enumerate(grids)}
    entries = {}
    for a in arrays:
        if a.path in on_grid:
            entry: dict[str, Any] = {"dtype": dtype_to_str(a.dtype, a.path), "shape": list(a.shape)}
            entry["sharding"] = a.sharding
            entry["grid"] = number[on_grid[a.path]]
        else:
            entry = array_json(manifest.arrays[a.path])
        entries[a.path] = entry
    doc = {
        "format": FORMAT,
        "format_version": GRID_VERSION,
        "checksum": ALGORITHM,
        "structure": structure,
        "arrays": entries,
        "grids": [{"cell": list(cell), "writers": writers} for cell, writers in grids.values()],
        "parts": [part.part_file for part in parts],
        "values": values,
        "files": manifest.files,
    }
    raw = json.dumps(doc, separators=(",", ":")).encode()
    if len(raw) > MANIFEST_MAX_BYTES:
        raise ManifestError(f"the manifest would be {len(raw)} bytes, over the readers' limit")
    return raw
