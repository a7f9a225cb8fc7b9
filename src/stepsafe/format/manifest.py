"""The manifest: everything about one checkpoint's tree except the array bytes.

Reading it alone answers "what is in this checkpoint" (keys, dtypes, shapes, sizes) and tells a
reader exactly which byte ranges of which data files hold each shard, so a partial restore reads
only what it needs. It is JSON, parsed with validation: a manifest is untrusted input.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stepsafe.errors import ManifestError, UnsupportedFormatError
from stepsafe.format.checksum import ALGORITHM
from stepsafe.format.dtypes import dtype_from_str
from stepsafe.tree import Structure, check_structure, structure_paths

FORMAT = "stepsafe"
FORMAT_VERSION = 1
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")


@dataclass(frozen=True)
class Chunk:
    """A contiguous run of a shard's bytes inside one data file."""

    file: str
    offset: int
    length: int
    checksum: str


@dataclass(frozen=True)
class Shard:
    """A box of the global array (``index``: [start, stop) per axis) and where its bytes lie."""

    index: tuple[tuple[int, int], ...]
    chunks: tuple[Chunk, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.index)

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.index)


@dataclass(frozen=True)
class ArrayEntry:
    dtype: np.dtype
    dtype_name: str
    shape: tuple[int, ...]
    shards: tuple[Shard, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Manifest:
    structure: Structure
    arrays: dict[str, ArrayEntry] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "checksum": ALGORITHM,
            "structure": self.structure,
            "arrays": {
                k: {
                    "dtype": a.dtype_name,
                    "shape": list(a.shape),
                    "shards": [
                        {
                            "index": [list(r) for r in s.index],
                            "chunks": [[c.file, c.offset, c.length, c.checksum] for c in s.chunks],
                        }
                        for s in a.shards
                    ],
                }
                for k, a in self.arrays.items()
            },
            "values": self.values,
            "files": self.files,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

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


def _parse(doc: dict, where: str) -> Manifest:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError("not a stepsafe manifest")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"checkpoint {where} has format version {version!r}; this stepsafe reads version "
            f"{FORMAT_VERSION}: upgrade stepsafe to read it"
        )
    if doc.get("checksum") != ALGORITHM:
        raise ManifestError(f"unknown checksum algorithm {doc.get('checksum')!r}")
    files = {str(name): _nonneg(size) for name, size in doc["files"].items()}
    for name in files:
        if not _FILE_NAME.match(name) or ".." in name:
            raise ManifestError(f"data file name {name!r} would escape the checkpoint directory")
    arrays = {str(k): _parse_array(k, a, files) for k, a in doc["arrays"].items()}
    values = dict(doc["values"])
    structure = doc["structure"]
    check_structure(structure)
    paths = structure_paths(structure)
    if set(paths) != set(arrays) | set(values) or len(paths) != len(arrays) + len(values):
        raise ManifestError("structure and leaf entries disagree")
    return Manifest(structure, arrays, values, files)


def _nonneg(x: Any) -> int:
    if type(x) is not int or x < 0:
        raise ManifestError(f"expected a non-negative integer, got {x!r}")
    return x


def _parse_array(key: str, a: dict, files: dict[str, int]) -> ArrayEntry:
    """One array entry, fully validated; written flat because a manifest may hold thousands."""
    dtype = dtype_from_str(a["dtype"])
    shape = tuple(_nonneg(d) for d in a["shape"])
    shards = []
    for s in a["shards"]:
        index = tuple((lo, hi) for lo, hi in s["index"])
        if len(index) != len(shape):
            raise ManifestError(f"array {key!r}: shard index {index} does not fit shape {shape}")
        elements = 1
        for (lo, hi), n in zip(index, shape):
            if type(lo) is not int or type(hi) is not int or not 0 <= lo <= hi <= n:
                raise ManifestError(f"array {key!r}: shard index {index} outside shape {shape}")
            elements *= hi - lo
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
            total += length
            chunks.append(Chunk(name, offset, length, digest))
        if total != elements * dtype.itemsize:
            raise ManifestError(f"array {key!r}: shard {index} byte count does not match its shape")
        shards.append(Shard(index, tuple(chunks)))
    if len(shards) != 1 or shards[0].index != tuple((0, n) for n in shape):
        _check_exact_cover(key, shape, shards)
    return ArrayEntry(dtype, a["dtype"], shape, tuple(shards))


def _check_exact_cover(key: str, shape: tuple[int, ...], shards: list[Shard]) -> None:
    """Every element in exactly one shard: no gap (uninitialised memory would be restored as
    if it were data) and no overlap. Checked on the grid cut by all shard boundaries."""
    if math.prod(shape) == 0:
        return
    cuts = [
        sorted({0, n, *(b for s in shards for b in s.index[axis])}) for axis, n in enumerate(shape)
    ]
    if math.prod(len(c) - 1 for c in cuts) > 1 << 22:
        raise ManifestError(f"array {key!r}: shard layout too irregular to check")
    grid = np.zeros([len(c) - 1 for c in cuts], np.int32)
    for s in shards:
        box = tuple(
            slice(c.index(lo), c.index(hi)) for c, (lo, hi) in zip(cuts, s.index, strict=True)
        )
        grid[box] += 1
    if not (grid == 1).all():
        problem = "overlap" if (grid > 1).any() else "leave gaps in"
        raise ManifestError(f"array {key!r}: its shards {problem} the array")
