"""A prototype of the many-process manifest (measured by ``benchmarks.scale_model``, not used by
stepsafe): one grid description per array, each process's chunk table in a part of its own.

Today's manifest lists every shard of every array with its chunks, and every process that
restores reads all of it: at 1,000 processes x 10,000 arrays that is 10 million shards, ~1.2 GB
of JSON. Here the top manifest (``items/manifest.<id>.json``) describes each array by its
shape and a *layout*: how many cells the grid has along each axis (the regular grid of the
array's sharding; a cell's box is computed, so the cells tile the array exactly by
construction) and which process wrote each cell, as runs (``[cells, first writer, cells per
writer]``; a layout is shared by every array with the same sharding). Each process's chunk
table (file, offset, length, checksum of each cell it wrote) lies in its part,
``items/part_<p>.<id>.json``, listed in the top manifest with its size, checksum and number of
cells. A restoring process reads the top manifest and only the parts of the writers of the
cells that overlap its own boxes; what it plans then is today's ``regions.plan_array_read``
over just those shards.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from stepsafe.errors import ManifestError
from stepsafe.format.checksum import checksum
from stepsafe.format.dtypes import dtype_from_str, dtype_to_str
from stepsafe.format.manifest import MAX_CHUNK, ArrayEntry, Box, Chunk, Shard
from stepsafe.format.regions import ArrayRead, plan_array_read
from stepsafe.format.written import WrittenPart

FORMAT_VERSION = 2
MAX_CELLS = 1 << 24  # cells of one layout: a reader refuses more before allocating


@dataclass(frozen=True)
class Layout:
    """A grid of ``cells`` (count per axis) and the runs that say who wrote each cell, in
    row-major order: run ``[n, first, per]`` gives its ``n`` cells to writers ``first``,
    ``first + 1``, ... ``per`` cells each."""

    cells: tuple[int, ...]
    runs: tuple[tuple[int, int, int], ...]

    def writer(self, cell: int) -> int:
        for n, first, per in self.runs:
            if cell < n:
                return first + cell // per
            cell -= n
        raise ManifestError(f"cell {cell} beyond the layout")

    def counts(self, processes: int) -> np.ndarray:
        """How many cells each process wrote (O(processes), not O(cells) when runs are long)."""
        out = np.zeros(processes, np.int64)
        for n, first, per in self.runs:
            full, rest = divmod(n, per)
            out[first : first + full] += per
            if rest:
                out[first + full] += rest
        return out


def cell_box(shape: Sequence[int], cells: Sequence[int], cell: int) -> Box:
    """The box of flat cell ``cell``: a regular grid, the last cells clipped (JAX's uneven
    shards); a cell past the end of a short axis is empty."""
    box = []
    for n, c in zip(reversed(shape), reversed(cells)):
        cell, i = divmod(cell, c)
        step = -(-n // c)
        box.append((min(n, i * step), min(n, (i + 1) * step)))
    return tuple(reversed(box))


def cell_of(shape: Sequence[int], cells: Sequence[int], box: Box) -> int:
    """The flat index of the cell whose box starts where ``box`` does."""
    flat = 0
    for n, c, (lo, _) in zip(shape, cells, box):
        flat = flat * c + lo // (-(-n // c) or 1)
    return flat


def cells_in(shape: Sequence[int], cells: Sequence[int], box: Box) -> list[int]:
    """The flat indices of the cells that overlap ``box``."""
    flat = [0]
    for n, c, (lo, hi) in zip(shape, cells, box):
        step = -(-n // c) or 1
        axis = range(lo // step, min(c, -(-hi // step)))
        flat = [f * c + i for f in flat for i in axis]
    return flat


def layout_of_row_sharding(processes: int) -> Layout:
    """Rows split over all processes, one cell each: one run, whatever the process count."""
    return Layout((processes, 1), ((processes, 0, 1),))


# -- save: each process writes its part; process 0 merges only the parts' summaries ---------


def build_part(
    process: int, part: WrittenPart, order: dict[str, int], arrays: list[dict], layouts: list
) -> tuple[bytes, int]:
    """Process ``process``'s part file from what it wrote, checked against the layouts: every
    shard is one cell this process writes, none twice, each holding its box's bytes, and all
    its cells are there. Returns the part's bytes and its number of cells."""
    files = list(part.files)
    file_no = {name: i for i, name in enumerate(files)}
    rows = []
    for key, shards in part.shards.items():
        n = order[key]
        a = arrays[n]
        lay = layouts[a["layout"]]
        for s in shards:
            cell = cell_of(a["shape"], lay.cells, s.index)
            if cell_box(a["shape"], lay.cells, cell) != s.index or lay.writer(cell) != process:
                raise ManifestError(
                    f"array {key!r}: shard {s.index} is not a cell of process {process}"
                )
            rows.append(
                [n, cell, [[file_no[c.file], c.offset, c.length, c.checksum] for c in s.chunks]]
            )
    raw = json.dumps(
        {"process": process, "files": [[f, part.files[f]] for f in files], "cells": rows},
        separators=(",", ":"),
    ).encode()
    return raw, len(rows)


def merge_top(
    structure: list,
    arrays: dict[str, dict],
    layouts: list[Layout],
    parts: list[tuple[str, int, str, int]],
    values: dict,
) -> bytes:
    """Process 0's commit-time merge: the arrays' grid descriptions and the parts' summaries
    (name, bytes, checksum, cells). Each part was checked by its writer against the layouts;
    here, that each process reports exactly the cells its layouts give it (O(layouts x
    processes + arrays), never O(shards))."""
    per_layout = np.bincount([a["layout"] for a in arrays.values()], minlength=len(layouts))
    want = sum(int(k) * lay.counts(len(parts)) for k, lay in zip(per_layout, layouts))
    for p, (name, _, _, cells) in enumerate(parts):
        if cells != want[p]:
            raise ManifestError(f"process {p} wrote {cells} cells of {want[p]}: {name} is partial")
    doc = {
        "format": "stepsafe",
        "format_version": FORMAT_VERSION,
        "checksum": "xxh3_64",
        "structure": structure,
        "values": values,
        "layouts": [
            {"cells": list(lay.cells), "writers": [list(r) for r in lay.runs]} for lay in layouts
        ],
        "arrays": {
            k: {
                "dtype": dtype_to_str(a["dtype"], k),
                "shape": list(a["shape"]),
                "layout": a["layout"],
            }
            for k, a in arrays.items()
        },
        "parts": [list(p) for p in parts],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


# -- restore: the top manifest, then only the parts a process needs --------------------------


@dataclass
class Top:
    keys: list[str]
    arrays: list[tuple[np.dtype, str, tuple[int, ...], int]]  # dtype, its name, shape, layout
    layouts: list[Layout]
    parts: list[tuple[str, int, str, int]]


def parse_top(raw: bytes) -> Top:
    """The top manifest, validated: every layout's runs cover exactly its cells and name only
    listed processes; every array's layout exists and has its number of axes. (The structure
    and values are checked as today's manifest does; left out of this prototype.)"""
    doc = json.loads(raw)
    if doc.get("format_version") != FORMAT_VERSION:
        raise ManifestError("not a version 2 manifest")
    parts = [(str(n), int(b), str(c), int(k)) for n, b, c, k in doc["parts"]]
    layouts = []
    for lay in doc["layouts"]:
        cells = tuple(int(c) for c in lay["cells"])
        runs = tuple((int(n), int(f), int(per)) for n, f, per in lay["writers"])
        if any(c < 1 for c in cells) or math.prod(cells) > MAX_CELLS:
            raise ManifestError(f"layout with cells {cells} refused")
        if sum(n for n, _, _ in runs) != math.prod(cells) or any(
            n < 1 or per < 1 or f < 0 or f + (n - 1) // per >= len(parts) for n, f, per in runs
        ):
            raise ManifestError(f"layout {cells}: its writers do not cover its cells")
        layouts.append(Layout(cells, runs))
    keys, arrays = [], []
    for k, a in doc["arrays"].items():
        shape = tuple(int(d) for d in a["shape"])
        lay = int(a["layout"])
        if not 0 <= lay < len(layouts) or len(layouts[lay].cells) != len(shape):
            raise ManifestError(f"array {k!r}: bad layout {lay}")
        keys.append(k)
        arrays.append((dtype_from_str(a["dtype"]), str(a["dtype"]), shape, lay))
    return Top(keys, arrays, layouts, parts)


def parse_part(raw: bytes, process: int, top: Top) -> dict[tuple[int, int], Shard]:
    """Part ``process``, checked against its entry in the top manifest (checksum, cells) and
    the layouts: each cell is one its process writes, listed once, with its box's bytes in
    chunks inside the part's own files. With the count, the part holds exactly its cells."""
    name, size, digest, count = top.parts[process]
    if len(raw) != size or checksum(raw) != digest:
        raise ManifestError(f"{name} does not match its checksum in the manifest")
    doc = json.loads(raw)
    if doc["process"] != process:
        raise ManifestError(f"{name} is the part of process {doc['process']}")
    files = [(str(f), int(n)) for f, n in doc["files"]]
    if any(not f.startswith(f"process_{process}.") for f, _ in files):
        raise ManifestError(f"{name} lists another process's data file")
    used = [0] * len(files)
    out: dict[tuple[int, int], Shard] = {}
    for n, cell, chunks in doc["cells"]:
        dtype, _, shape, lay = top.arrays[n]
        layout = top.layouts[lay]
        if not 0 <= cell < math.prod(layout.cells) or layout.writer(cell) != process:
            raise ManifestError(f"{name}: cell {cell} of {top.keys[n]!r} is not its process's")
        if (n, cell) in out:
            raise ManifestError(f"{name}: cell {cell} of {top.keys[n]!r} listed twice")
        box = cell_box(shape, layout.cells, cell)
        total, got = 0, []
        for f, off, length, c in chunks:
            fname, fsize = files[f]
            if off < 0 or length < 0 or length > MAX_CHUNK or off + length > fsize:
                raise ManifestError(f"{name}: chunk {off}+{length} beyond {fname}")
            used[f] += length
            total += length
            got.append(Chunk(fname, off, length, c))
        if total != math.prod(hi - lo for lo, hi in box) * dtype.itemsize:
            raise ManifestError(f"{name}: cell {cell} of {top.keys[n]!r} has the wrong size")
        out[(n, cell)] = Shard(box, tuple(got))
    if len(out) != count or any(u > s for u, (_, s) in zip(used, files)):
        raise ManifestError(f"{name} holds {len(out)} cells, the manifest says {count}")
    return out


def plan_restore(
    top: Top, read_part: Callable[[int], bytes], boxes: Callable[[int], Box]
) -> tuple[list[ArrayRead], list[int]]:
    """Plan one process's restore: ``boxes(n)`` is its box of array ``n``; the parts of the
    writers of the overlapping cells are read (``read_part``), each once, and today's
    planning runs over just those shards. Returns the plans and the parts read."""
    wanted = []
    need: set[int] = set()
    for n, (_, _, shape, lay) in enumerate(top.arrays):
        layout = top.layouts[lay]
        cells = cells_in(shape, layout.cells, boxes(n))
        wanted.append(cells)
        need.update(layout.writer(c) for c in cells)
    shards: dict[tuple[int, int], Shard] = {}
    for p in sorted(need):
        shards.update(parse_part(read_part(p), p, top))
    plans = []
    for n, (dtype, name, shape, _) in enumerate(top.arrays):
        entry = ArrayEntry(dtype, name, shape, tuple(shards[(n, c)] for c in wanted[n]))
        plans.append(plan_array_read(top.keys[n], entry, [boxes(n)]))
    return plans, sorted(need)
