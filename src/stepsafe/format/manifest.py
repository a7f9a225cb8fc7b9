"""The manifest: everything about one checkpoint's tree except the array bytes.

Reading it alone answers "what is in this checkpoint" (keys, dtypes, shapes, sizes) and tells a
reader exactly which byte ranges of which data files hold each shard, so a partial restore reads
only what it needs. It is JSON, parsed with validation: a manifest is untrusted input.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

import numpy as np

from stepsafe.errors import ManifestError, UnsupportedFormatError, UnsupportedLeafError
from stepsafe.format.checksum import ALGORITHM
from stepsafe.format.dtypes import dtype_from_str
from stepsafe.format.grid import Grid, fits
from stepsafe.tree import Structure, check_structure, structure_paths

FORMAT = "stepsafe"
FORMAT_VERSION = 1  # what a single process writes
GRID_VERSION = 2  # what many processes write: regular shardings as grids, chunks in part files
READS = (FORMAT_VERSION, GRID_VERSION)
# Limits every writer stays within, so readers can refuse anything beyond them before
# allocating: a manifest is untrusted input, and a claimed size is not yet a real one.
MAX_CHUNK = 64 << 20  # bytes per chunk: the checksum granularity; readers verify in parallel
MANIFEST_MAX_BYTES = 1 << 30  # ~5M shards; a 40k-shard manifest is ~4 MB
MAX_COVER_CELLS = 1 << 22  # irregular shard layouts: cells of the grid their boundaries cut
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")


class Chunk(NamedTuple):
    """A contiguous run of a shard's bytes inside one data file. A tuple, as ``Shard``: a
    manifest holds one per megabyte of state, and making a frozen dataclass costs a restore
    of a hundred small arrays a tenth of its time."""

    file: str
    offset: int
    length: int
    checksum: str


Box = tuple[tuple[int, int], ...]


class Shard(NamedTuple):
    """A box of the global array (``index``: [start, stop) per axis) and where its bytes lie."""

    index: Box
    chunks: tuple[Chunk, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.index)

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.index)


@dataclass(slots=True)
class ArrayEntry:
    """One saved array. ``sharding``: how it lay on devices when saved (``parse_sharding``'s
    form), so that a restore without a sharding of its own can use it; None for host arrays
    and manifests written before it was recorded. Not frozen: a frozen dataclass costs a
    microsecond to make, a fifth of parsing a small array's entry; nothing changes one."""

    dtype: np.dtype
    dtype_name: str
    shape: tuple[int, ...]
    shards: Sequence[Shard]
    sharding: dict | None = None
    grid: Grid | None = None  # version 2: shards in part files

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def shards_over(self, boxes: Sequence[Box]) -> Sequence[Shard]:
        """The shards a read of ``boxes`` needs: all of them, or, for an array whose shards
        lie in part files (a grid), the cells that overlap ``boxes`` only."""
        if self.grid is None:
            return self.shards
        cells = sorted({c for box in boxes for c in self.grid.cells_over(box, self.shape)})
        return self.shards.over(cells)  # type: ignore[attr-defined]


@dataclass
class Manifest:
    structure: Structure
    arrays: dict[str, ArrayEntry] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    parts: Any = None  # version 2: the part files' loader (``parts.PartLoader``)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "checksum": ALGORITHM,
            "structure": self.structure,
            "arrays": {k: array_json(a) for k, a in self.arrays.items()},
            "values": self.values,
            "files": self.files,
        }
        raw = json.dumps(doc, separators=(",", ":")).encode()
        if len(raw) > MANIFEST_MAX_BYTES:
            raise UnsupportedLeafError(
                f"the manifest would be {len(raw)} bytes of JSON, more than the "
                f"{MANIFEST_MAX_BYTES} that readers accept: the tree has too many arrays or "
                "shards for one checkpoint"
            )
        return raw

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ManifestError(
                f"manifest {where} is not valid JSON ({e}): the file is corrupt"
            ) from e
        try:
            return _parse(doc, where)
        except UnsupportedFormatError:
            raise
        except ManifestError as e:
            raise ManifestError(f"manifest {where}: {e}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as e:
            raise ManifestError(f"manifest {where} is malformed ({type(e).__name__}: {e})") from e


def array_json(a: ArrayEntry) -> dict:
    """An array entry with its shards listed (version 1; version 2's arrays off any grid)."""
    doc: dict[str, Any] = {"dtype": a.dtype_name, "shape": list(a.shape)}
    if a.sharding is not None:  # absent, not null: manifests of host arrays stay as they were
        doc["sharding"] = a.sharding
    doc["shards"] = [
        {
            "index": [list(r) for r in s.index],
            "chunks": [[c.file, c.offset, c.length, c.checksum] for c in s.chunks],
        }
        for s in a.shards
    ]
    return doc


def _parse(doc: dict, where: str) -> Manifest:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError("not a stepsafe manifest")
    version = doc.get("format_version")
    if version not in READS:
        raise UnsupportedFormatError(
            f"checkpoint {where} has format version {version!r}; this stepsafe reads versions "
            f"{', '.join(map(str, READS))}: upgrade stepsafe to read it"
        )
    if doc.get("checksum") != ALGORITHM:
        raise ManifestError(f"unknown checksum algorithm {doc.get('checksum')!r}")
    files = {str(name): _nonneg(size) for name, size in doc["files"].items()}
    for name in files:
        if not _FILE_NAME.match(name) or ".." in name:
            raise ManifestError(f"data file name {name!r} would escape the checkpoint directory")
    used = dict.fromkeys(files, 0)
    grids = _parse_grids(doc) if version == GRID_VERSION else {}
    arrays = {
        str(k): _parse_array(k, a, files, used) if "grid" not in a else grids[a["grid"]](k, a)
        for k, a in doc["arrays"].items()
    }
    for name, size in files.items():
        if used[name] > size:  # chunks overlap: more bytes to allocate than the files hold
            raise ManifestError(f"chunks claim {used[name]} bytes of {name}, which has {size}")
    on_grids = sum(a.nbytes for a in arrays.values() if a.grid is not None)
    if on_grids + sum(used.values()) > sum(files.values()):  # checked before any part is read
        raise ManifestError("the arrays claim more bytes than the data files hold")
    values = dict(doc["values"])
    structure = doc["structure"]
    check_structure(structure)
    paths = structure_paths(structure)
    if set(paths) != set(arrays) | set(values) or len(paths) != len(arrays) + len(values):
        raise ManifestError("structure and leaf entries disagree")
    manifest = Manifest(structure, arrays, values, files)
    if version == GRID_VERSION:
        manifest.parts = _bind_parts(doc, manifest, used)
    return manifest


def _parse_grids(doc: dict) -> dict[int, Any]:
    """Version 2: per grid number, a function that makes an array entry on that grid (its
    shards come from the part files; see ``parts.py``)."""
    processes = len(doc["parts"])
    out = {}
    for n, g in enumerate(doc["grids"]):
        cell = tuple(_nonneg(c) for c in g["cell"])
        writers = tuple(_nonneg(w) for w in g["writers"])
        if any(w >= processes for w in writers) or 0 in cell:
            raise ManifestError(f"grid {n} names a process or cell that does not exist")
        out[n] = _grid_array(Grid(cell, writers))
    return out


def _grid_array(grid: Grid) -> Any:
    def make(key: str, a: dict) -> ArrayEntry:
        dtype = dtype_from_str(a["dtype"])
        shape = _shape(key, a["shape"], dtype)
        if (
            0 in shape
            or not fits(grid.cell, shape)
            or math.prod(grid.counts(shape)) != len(grid.writers)
        ):
            raise ManifestError(f"array {key!r}: its grid does not tile its shape {shape}")
        sharding = a.get("sharding")
        if sharding is not None:
            sharding = parse_sharding(key, sharding, len(shape))
        return ArrayEntry(dtype, a["dtype"], shape, (), sharding, grid)

    return make


def _bind_parts(doc: dict, manifest: Manifest, used: dict[str, int]) -> Any:
    """The part files' loader, and every grid array's shards made lazy over it."""
    from stepsafe.format.parts import LazyShards, PartLoader

    parts: list[tuple[str, int, str] | None] = []
    for entry in doc["parts"]:
        if entry is None:
            parts.append(None)
            continue
        name, size, digest = entry
        if not isinstance(name, str) or not _FILE_NAME.match(name) or type(digest) is not str:
            raise ManifestError(f"part file {name!r} is not a part file's name")
        parts.append((name, _nonneg(size), digest))
    grids = {
        k: (a.grid, a.shape, a.dtype.itemsize)
        for k, a in manifest.arrays.items()
        if a.grid is not None
    }
    loader = PartLoader(parts, manifest.files, grids, used)  # type: ignore[arg-type]
    for k, a in list(manifest.arrays.items()):
        if a.grid is not None:
            lazy = LazyShards(loader, k, len(a.grid.writers))
            manifest.arrays[k] = ArrayEntry(
                a.dtype, a.dtype_name, a.shape, lazy, a.sharding, a.grid
            )
    return loader


_MAX_NDIM = 64  # numpy's limit
_MAX_ELEMENTS_BYTES = 1 << 62  # what numpy can address, with every empty axis counted as 1


def _shape(key: str, doc: Any, dtype: np.dtype) -> tuple[int, ...]:
    """An array's shape, refused unless numpy can make an array of it (no raw error later)."""
    shape = tuple(doc)
    elements = 1  # every empty axis counted as 1
    for d in shape:
        if type(d) is not int or d < 0:
            _nonneg(d)
        elements *= d or 1
    if len(shape) > _MAX_NDIM or elements * (dtype.itemsize or 1) > _MAX_ELEMENTS_BYTES:
        raise ManifestError(f"array {key!r}: shape {shape[:8]} is beyond what numpy can hold")
    return shape


def _nonneg(x: Any) -> int:
    if type(x) is not int or x < 0:
        raise ManifestError(f"expected a non-negative integer, got {x!r}")
    return x


def _parse_array(key: str, a: dict, files: dict[str, int], used: dict[str, int]) -> ArrayEntry:
    """One array entry, fully validated; written flat because a manifest may hold thousands.
    ``used`` adds up, per data file, the bytes that chunks claim in it."""
    dtype = dtype_from_str(a["dtype"])
    shape = _shape(key, a["shape"], dtype)
    itemsize = dtype.itemsize
    shards = []
    whole = True  # one shard covering the whole array (the common case: no cover check)
    for s in a["shards"]:
        index = tuple(map(tuple, s["index"]))  # each a (lo, hi) pair: checked just below
        if len(index) != len(shape):
            raise ManifestError(f"array {key!r}: shard index {index} does not fit shape {shape}")
        elements = 1
        for (lo, hi), n in zip(index, shape):
            if type(lo) is not int or type(hi) is not int or not 0 <= lo <= hi <= n:
                raise ManifestError(f"array {key!r}: shard index {index} outside shape {shape}")
            elements *= hi - lo
            whole = whole and lo == 0 and hi == n
        chunks = []
        total = 0
        for name, offset, length, digest in s["chunks"]:
            size = files.get(name)
            if size is None:
                raise ManifestError(f"array {key!r} points at unlisted data file {name!r}")
            if type(offset) is not int or type(length) is not int or type(digest) is not str:
                raise ManifestError(f"array {key!r}: malformed chunk {[name, offset, length]}")
            if offset < 0 or length < 0 or offset + length > size:
                raise ManifestError(f"array {key!r}: chunk at {offset}+{length} beyond {name}")
            if length > MAX_CHUNK:
                raise ManifestError(
                    f"array {key!r}: chunk of {length} bytes in {name}, more than the "
                    f"{MAX_CHUNK} bytes any writer puts in one"
                )
            used[name] += length
            total += length
            chunks.append(Chunk(name, offset, length, digest))
        if total != elements * itemsize:
            raise ManifestError(f"array {key!r}: shard {index} byte count does not match its shape")
        shards.append(Shard(index, tuple(chunks)))
    if not whole or len(shards) != 1:
        check_exact_cover(key, shape, shards)
    sharding = a.get("sharding")
    if sharding is not None:
        sharding = parse_sharding(key, sharding, len(shape))
    return ArrayEntry(dtype, a["dtype"], shape, tuple(shards), sharding)


_MAX_MESH_AXES = 64


def parse_sharding(key: str, doc: Any, ndim: int) -> dict:
    """A saved sharding record, checked: ``{"mesh": {"axis_names": [...], "shape": [...]},
    "spec": [...]}``, the mesh's distinct axis names (strings) and their sizes (positive), and
    one spec entry per leading array axis (at most ``ndim``): None (not sharded), an axis name,
    or a list of axis names, no name used twice. Returned as a fresh, plain copy.

    Raises:
        ManifestError: naming ``key`` and what is wrong.
    """

    def bad(what: str) -> NoReturn:
        raise ManifestError(f"array {key!r}: sharding {what}")

    if not isinstance(doc, dict) or set(doc) != {"mesh", "spec"}:
        bad("must be an object with exactly the keys 'mesh' and 'spec'")
    mesh = doc["mesh"]
    if not isinstance(mesh, dict) or set(mesh) != {"axis_names", "shape"}:
        bad("mesh must be an object with exactly the keys 'axis_names' and 'shape'")
    names, sizes, spec = mesh["axis_names"], mesh["shape"], doc["spec"]
    if not isinstance(names, list) or not isinstance(sizes, list) or len(names) != len(sizes):
        bad("mesh axis_names and shape must be lists of the same length")
    if len(names) > _MAX_MESH_AXES:
        bad(f"mesh has {len(names)} axes, more than {_MAX_MESH_AXES}")
    if not all(type(n) is str for n in names) or len(set(names)) != len(names):
        bad(f"mesh axis names {names!r} must be distinct strings")
    if not all(type(n) is int and n > 0 for n in sizes):
        bad(f"mesh shape {sizes!r} must hold positive integers")
    if not isinstance(spec, list) or len(spec) > ndim:
        bad(f"spec {spec!r} must be a list of at most {ndim} entries (the array's axes)")
    used: list[str] = []
    out: list[Any] = []
    for entry in spec:
        group = [entry] if type(entry) is str else entry
        if entry is None:
            out.append(None)
            continue
        if not isinstance(group, list) or not all(type(n) is str for n in group):
            bad(f"spec entry {entry!r} must be null, an axis name or a list of axis names")
        if not all(n in names for n in group):
            bad(f"spec entry {entry!r} names an axis the mesh {names!r} does not have")
        used.extend(group)
        out.append(entry if type(entry) is str else list(group))
    if len(set(used)) != len(used):
        bad(f"spec {spec!r} uses a mesh axis twice")
    return {"mesh": {"axis_names": list(names), "shape": list(sizes)}, "spec": out}


def check_exact_cover(key: str, shape: tuple[int, ...], shards: Sequence[Shard]) -> None:
    """Every element of array ``key`` in exactly one shard: no gap (uninitialised memory would
    be restored as if it were data) and no overlap (bytes saved twice, some never read).

    Readers check it on every manifest; writers before every commit, so that no manifest that
    misses part of an array is ever committed. Near-linear in the number of shards: shards
    tiling a grid (what every writer produces: one box per device, or per process) are checked
    cell by cell; any other layout on the grid cut by all shard boundaries, if that stays small.

    Raises:
        ManifestError: naming ``key`` and whether the shards overlap or leave gaps.
    """
    total = math.prod(shape)
    if total == 0:
        return
    boxes = [s.index for s in shards if all(lo < hi for lo, hi in s.index)]
    volume = sum(math.prod(hi - lo for lo, hi in box) for box in boxes)
    if volume != total:
        _cover_error(key, "overlap" if volume > total else "leave gaps in")
    # A grid: on every axis the shards' ranges are the pieces of one partition of the axis.
    axes = [sorted({box[axis] for box in boxes}) for axis in range(len(shape))]
    if all(_partitions(ranges, n) for ranges, n in zip(axes, shape, strict=True)):
        pos = [{r: i for i, r in enumerate(ranges)} for ranges in axes]
        cells = {tuple(p[r] for p, r in zip(pos, box, strict=True)) for box in boxes}
        if len(cells) != len(boxes):  # distinct cells of a partition cannot overlap
            _cover_error(key, "overlap")
        return  # distinct, disjoint, and their volumes add up to the whole: an exact cover
    _check_cover_on_cuts(key, shape, boxes)


def _partitions(ranges: list[tuple[int, int]], n: int) -> bool:
    """True when the sorted, distinct ``ranges`` are consecutive pieces of ``[0, n)``."""
    end = 0
    for lo, hi in ranges:
        if lo != end:
            return False
        end = hi
    return end == n


def _check_cover_on_cuts(key: str, shape: tuple[int, ...], boxes: list[Box]) -> None:
    """Irregular layouts: count how often each cell of the grid cut by every shard boundary is
    covered. Each box's cells are counted before any is touched, so overlapping boxes cannot
    make this cost more than the grid itself."""
    cuts = [
        sorted({0, n, *(b for box in boxes for b in box[axis])}) for axis, n in enumerate(shape)
    ]
    cells = math.prod(len(c) - 1 for c in cuts)
    if cells > MAX_COVER_CELLS:
        raise ManifestError(f"array {key!r}: shard layout too irregular to check")
    where = [{b: i for i, b in enumerate(c)} for c in cuts]
    spans = [tuple((w[lo], w[hi]) for w, (lo, hi) in zip(where, box, strict=True)) for box in boxes]
    counted = sum(math.prod(hi - lo for lo, hi in span) for span in spans)
    if counted != cells:
        _cover_error(key, "overlap" if counted > cells else "leave gaps in")
    grid = np.zeros([len(c) - 1 for c in cuts], np.uint8)
    for span in spans:
        grid[tuple(slice(lo, hi) for lo, hi in span)] += 1
    if not (grid == 1).all():
        _cover_error(key, "overlap")


def _cover_error(key: str, problem: str) -> NoReturn:
    raise ManifestError(f"array {key!r}: its shards {problem} the array")
