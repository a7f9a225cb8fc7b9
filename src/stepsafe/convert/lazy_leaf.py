"""An output array of a conversion, made only when the writer reaches its bytes.

A conversion describes its output tree with ``OutLeaf`` s (shape, dtype, and how to make the
array) instead of arrays; the writer streams the data files one after another in tree order
(``format.written``: shards made on demand are written in order), so each array is made when
its first byte is due (a little earlier, on a thread of its own: ``pipeline.Ahead``) and dropped
once its last byte is written: about one array of the model is in memory at a time, whatever
the model's size. An array bigger than ``CONVERT_BLOCK_BYTES`` whose source can read a region
(``OutLeaf.box``) is made block by block instead: contiguous runs of its rows, one block held
at a time, so that even one stacked weight of hundreds of GB needs only a block's memory.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from stepsafe import knobs
from stepsafe.convert.buffers import empty
from stepsafe.errors import ManifestError
from stepsafe.format.manifest import Box
from stepsafe.format.plan import LazyShard

T = TypeVar("T")


@dataclass(frozen=True)
class OutLeaf:
    """An output array to be made by ``make()`` (shape ``shape``, dtype ``dtype``). Leaves of
    one ``group`` (the slices of one stacked array) are written one after another,
    whatever their places in the tree, so that what they share is read once and held briefly.
    ``box``, where the source can read a region: makes the region ``((start, stop), ..)`` of
    the array alone, so that a big array is made block by block (``blocks``)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]
    group: str | None = None
    box: Callable[[Box], np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def made(self) -> np.ndarray:
        """``make()``, checked to be the array planned (C-contiguous): what a lazy op builds
        on, so that a source making another shape or dtype is refused, never broadcast or
        cast into the output.

        Raises:
            ManifestError: it came out another shape or dtype than planned.
        """
        return _checked(self.make(), self.shape, self.dtype)

    def region(self, box: Box) -> np.ndarray:
        """``box(box)`` (the source must read regions), checked as ``made`` is.

        Raises:
            ManifestError: it came out another shape or dtype than the region's.
        """
        assert self.box is not None
        return _checked(self.box(box), tuple(b - a for a, b in box), self.dtype)

    def blocks(self, limit: int | None = None) -> Iterator[np.ndarray]:
        """The array in C order, as contiguous blocks of at most about ``limit`` bytes
        (``CONVERT_BLOCK_BYTES``) when it is bigger and ``box`` can read regions, else whole.

        Raises:
            ManifestError: a block came out another shape or dtype than planned.
        """
        limit = int(knobs.CONVERT_BLOCK_BYTES) if limit is None else limit
        if self.box is None or self.nbytes <= limit:
            yield self.made()
            return
        for box in block_boxes(self.shape, np.dtype(self.dtype).itemsize, limit):
            yield self.region(box)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Made now, for code that wants an array (a conversion function written for arrays:
        it then holds what it made; ``convert.ops`` keeps it lazy)."""
        a = self.made()
        return a if dtype is None else a.astype(dtype)


def grouped(items: list[tuple[T, OutLeaf]]) -> list[tuple[T, OutLeaf]]:
    """``items`` in order, except that the leaves of one ``group`` follow its first one: what
    they share is then made once and dropped after the last of them."""
    first: dict[str, int] = {}
    keys = [
        (first.setdefault(leaf.group, i) if leaf.group is not None else i, i)
        for i, (_, leaf) in enumerate(items)
    ]
    return [item for _, item in sorted(zip(keys, items), key=lambda ki: ki[0])]


class LazyLeaf(LazyShard):
    """``leaf`` as the writer's shard: made at its first byte (its first block, when it is made
    block by block), each block dropped after its last byte; ``on_bytes(n)`` reports progress
    as bytes are handed to the writer. The writer asks for the bytes in order."""

    def __init__(
        self,
        key: str,
        leaf: OutLeaf,
        on_bytes: Callable[[int], None] | None = None,
        feed: Callable[[], Iterator[np.ndarray]] | None = None,
    ):
        """``feed``: the leaf's blocks as made ahead (``pipeline.Ahead.blocks``), taken the first
        time its bytes are asked for; asked again, they are made here (``leaf.blocks()``)."""
        self.key, self.leaf, self.nbytes = key, leaf, leaf.nbytes
        self._on_bytes = on_bytes
        self._feed = feed
        self._lock = threading.Lock()
        self._blocks: Iterator[np.ndarray] | None = None
        self._block = np.empty(0, np.uint8)
        self._at = 0  # the byte of the array where ``_block`` starts

    def bytes_at(self, start: int, stop: int) -> memoryview:
        with self._lock:
            try:
                view = self._range(start, stop)
            except ManifestError as e:
                raise ManifestError(f"conversion of {self.key!r}: {e}: nothing committed") from e
            if stop >= self.nbytes:  # the last bytes: the writer's views keep them alive
                self._blocks, self._block, self._at = None, np.empty(0, np.uint8), 0
        if self._on_bytes is not None:
            self._on_bytes(stop - start)
        return view

    def _range(self, start: int, stop: int) -> memoryview:
        if self._blocks is None or start < self._at:  # the first bytes, or asked again
            made = self._feed() if self._feed is not None else self.leaf.blocks()
            self._feed = None
            self._blocks = (b.reshape(-1).view(np.uint8) for b in made)
            self._block, self._at = np.empty(0, np.uint8), 0
        while start >= self._at + len(self._block):
            self._next()
        if stop <= self._at + len(self._block):
            return memoryview(self._block[start - self._at : stop - self._at])
        pieces = []  # a range across blocks (block edges need not meet the writer's chunks)
        while True:
            end = min(stop, self._at + len(self._block))
            pieces.append(self._block[start - self._at : end - self._at])
            if end == stop:
                return memoryview(np.concatenate(pieces))
            start = end
            self._next()

    def _next(self) -> None:
        assert self._blocks is not None
        self._at += len(self._block)
        self._block = next(self._blocks, None)  # type: ignore[arg-type]
        if self._block is None:
            raise ManifestError(f"its blocks ended at byte {self._at} of {self.nbytes}")


def block_boxes(shape: tuple[int, ...], itemsize: int, limit: int) -> list[Box]:
    """Regions of an array of ``shape`` that follow one another in C order, each contiguous
    and at most ``limit`` bytes (at least one element): ranges along the first axis whose
    trailing axes fit, at every index of the axes before it."""
    k = next(i for i in range(len(shape)) if math.prod(shape[i + 1 :]) * itemsize <= limit)
    step = max(1, limit // (math.prod(shape[k + 1 :]) * itemsize))
    tail = tuple((0, n) for n in shape[k + 1 :])
    return [
        (*((i, i + 1) for i in outer), (a, min(a + step, shape[k])), *tail)
        for outer in itertools.product(*(range(n) for n in shape[:k]))
        for a in range(0, shape[k], step)
    ]


def _checked(a: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    a, want = np.asarray(a), np.dtype(dtype)
    if a.dtype != want and a.dtype.newbyteorder("=") == want.newbyteorder("="):
        a = a.astype(want)  # the same values in the other byte order (a big-endian source)
    if a.shape != tuple(shape) or a.dtype != want:
        raise ManifestError(
            f"made an array of {a.shape} {a.dtype}, {tuple(shape)} {np.dtype(dtype)} was planned"
        )
    if a.flags.c_contiguous:
        return a
    out = empty(a.shape, a.dtype)  # a reused buffer on a pipeline's thread (0-d stays 0-d)
    np.copyto(out, a)
    return out
