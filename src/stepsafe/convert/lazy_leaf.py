"""An output array of a conversion, made only when the writer reaches its bytes.

A conversion describes its output tree with ``OutLeaf`` s (shape, dtype, and how to make the
array) instead of arrays; the writer streams the data files one after another in tree order
(``format.written``: shards made on demand are written in order), so each array is made when
its first byte is due and dropped once its last byte is written: one array of the model is in
memory at a time, whatever the model's size.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from stepsafe.errors import ManifestError
from stepsafe.format.plan import LazyShard

T = TypeVar("T")


@dataclass(frozen=True)
class OutLeaf:
    """An output array to be made by ``make()`` (shape ``shape``, dtype ``dtype``). Leaves of
    one ``group`` (the slices of one stacked array) are written one after another,
    whatever their places in the tree, so that what they share is read once and held briefly."""

    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]
    group: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Made now, for code that wants an array (a conversion function written for arrays:
        it then holds what it made; ``convert.ops`` keeps it lazy)."""
        a = np.asarray(self.make())
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
    """``leaf`` as the writer's shard: made at its first byte, dropped after its last;
    ``on_bytes(n)`` reports progress as bytes are handed to the writer."""

    def __init__(self, key: str, leaf: OutLeaf, on_bytes: Callable[[int], None] | None = None):
        self.key, self.leaf, self.nbytes = key, leaf, leaf.nbytes
        self._on_bytes = on_bytes
        self._lock = threading.Lock()
        self._flat: np.ndarray | None = None
        self._left = self.nbytes

    def bytes_at(self, start: int, stop: int) -> memoryview:
        with self._lock:
            if self._flat is None:
                self._flat = self._made()
            view = memoryview(self._flat[start:stop])
            self._left -= stop - start
            if self._left <= 0:
                self._flat = None  # the writer's views keep it alive until they are written
        if self._on_bytes is not None:
            self._on_bytes(stop - start)
        return view

    def _made(self) -> np.ndarray:
        a = np.asarray(self.leaf.make())
        if a.shape != self.leaf.shape or a.dtype != np.dtype(self.leaf.dtype):
            raise ManifestError(
                f"conversion of {self.key!r} made an array of {a.shape} {a.dtype}, "
                f"{self.leaf.shape} {np.dtype(self.leaf.dtype)} was planned: nothing committed"
            )
        return np.ascontiguousarray(a).reshape(-1).view(np.uint8)
