"""Output buffers reused from one made block to the next, on the thread that makes them.

A conversion makes its output arrays one after another (a stacked weight's layers, each a
copy), each written and then dropped. Memory fresh to a process costs a page fault per page
the first time it is written (the kernel zeroes each page; under a hypervisor every fault
exits to it): on a virtual machine that was more than the copy itself. So the thread that makes
blocks (``pipeline.Ahead``'s) keeps buffers, of a bounded total, and copies each new block into
one whose last block is gone: its pages are already mapped.

Gone means gone: a buffer is reused only when nothing refers to its memory any more (its
owner's reference count is back to what the pool alone holds): no array, view or memoryview of
a block handed out earlier survives, so a writer that still holds one (a bucket upload's
part in flight) keeps its bytes, and the pool takes a fresh buffer instead.

Elsewhere (no pool on the thread), ``empty`` is a fresh array as before.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Any

import numpy as np

from stepsafe.storage import host_memory

_local = threading.local()


class Pool:
    """Buffers of at most ``max_bytes`` in all, each reused once nothing refers to its memory;
    a block that does not fit beside the others gets a fresh buffer of its own, not kept."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._held: list[list[Any]] = []  # [buffer, its memory's owner, owner's count when free]

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype``, in the smallest
        free buffer big enough, or in a fresh one (kept if it fits, free ones dropped for it)."""
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        if nbytes == 0 or dt.hasobject or nbytes > self.max_bytes:
            return host_memory.empty(tuple(shape), dt)
        free = [held for held in self._held if sys.getrefcount(held[1]) <= held[2]]
        fits = [held for held in free if held[0].nbytes >= nbytes]
        if fits:
            raw = min(fits, key=lambda held: held[0].nbytes)[0]
            return raw[:nbytes].view(dt).reshape(shape)
        for held in sorted(free, key=lambda held: held[0].nbytes):
            if self.nbytes + nbytes <= self.max_bytes:
                break
            self._drop(held)  # too small for the blocks made now: its room, for one
        del free, fits
        if self.nbytes + nbytes > self.max_bytes:  # the kept ones are in use: one not kept
            return host_memory.empty(tuple(shape), dt)
        self._held.append(_new(nbytes))
        return self._held[-1][0].view(dt).reshape(shape)

    def _drop(self, held: list[Any]) -> None:
        self._held = [other for other in self._held if other is not held]  # (== compares arrays)

    def free_bytes(self) -> int:
        """The bytes of the buffers kept that nothing uses now."""
        return sum(held[0].nbytes for held in self._held if sys.getrefcount(held[1]) <= held[2])

    def trim(self, free: int) -> None:
        """Drop unused buffers, the biggest first, until those left unused hold at most
        ``free`` bytes: room for what is made next."""
        unused = [held for held in self._held if sys.getrefcount(held[1]) <= held[2]]
        left = sum(held[0].nbytes for held in unused)
        for held in sorted(unused, key=lambda held: -held[0].nbytes):
            if left <= free:
                break
            self._drop(held)
            left -= held[0].nbytes

    @property
    def nbytes(self) -> int:
        """The bytes of the buffers kept."""
        return sum(held[0].nbytes for held in self._held)

    def clear(self) -> None:
        """Drop every buffer (those still used elsewhere live on there)."""
        self._held.clear()


def _new(nbytes: int) -> list[Any]:
    """A fresh buffer as the pool holds it, with the count of references to its owner (what
    numpy's views of it refer to) while only the pool holds it: measured as it is checked, with
    no other name bound to either."""
    raw = host_memory.empty((nbytes,), np.dtype(np.uint8))
    held: list[Any] = [raw, raw[:0].base, 0]
    del raw
    held[2] = sys.getrefcount(held[1])
    return held


def empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array: from this thread's pool (``pooled``), if any."""
    pool: Pool | None = getattr(_local, "pool", None)
    if pool is None:
        return np.empty(shape, dtype)
    return pool.empty(tuple(shape), dtype)


class pooled:
    """Within it, ``empty`` on this thread reuses the buffers of one ``Pool`` of ``max_bytes``,
    dropped after."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def __enter__(self) -> Pool:
        self._before = getattr(_local, "pool", None)
        _local.pool = Pool(self.max_bytes)
        return _local.pool

    def __exit__(self, *exc: object) -> None:
        _local.pool.clear()
        _local.pool = self._before
