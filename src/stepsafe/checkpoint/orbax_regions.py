"""The arrays of an Orbax checkpoint read straight through tensorstore, whole or by region.

orbax-checkpoint's own restore reads a leaf whole, and holds about twice the array while it
does (tensorstore's read, then Orbax's copy). Here each array is opened with the tensorstore
spec orbax-checkpoint itself builds for it (``type_handlers.get_json_tspec_read`` of its
``ParamInfo``, in the context ``get_ts_context`` makes), so OCDBT or not, zarr2 or zarr3, a
local directory or a bucket, are tensorstore's business exactly as in Orbax's restore; nothing
here parses Orbax's files. A region is read by pieces of whole chunks (a chunk is the least
tensorstore decodes), so reading an array whose chunks are small (a sharded save: one chunk per
shard) holds about a piece, not the array. An array saved as one chunk (a numpy array's save)
is decoded whole whatever is read of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepsafe.errors import CorruptCheckpointError, TargetMismatchError
from stepsafe.format.manifest import Box


class StoreError(CorruptCheckpointError):
    """tensorstore could not open or read an array (what orbax-checkpoint's own restore may
    still read: its caller falls back to it); a shape or dtype that differs from Orbax's
    metadata is a plain ``CorruptCheckpointError``, never retried."""


@dataclass(frozen=True)
class ArraySpec:
    """One array as Orbax's metadata describes it: its parameter name (its file or OCDBT
    key), shape, dtype and chunk shape (None when the metadata has none)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk: tuple[int, ...] | None


class OrbaxRegions:
    """The arrays ``specs`` (stepsafe key -> ``ArraySpec``) of the Orbax item ``directory``
    (an ``epath.Path``), opened on first use, each checked against Orbax's metadata."""

    def __init__(
        self, ocp: Any, directory: Any, specs: dict[str, ArraySpec], use_zarr3: bool, where: str
    ):
        self._ocp, self._dir, self.specs, self._where = ocp, directory, specs, where
        self._use_zarr3 = use_zarr3
        self._use_ocdbt = False  # as Orbax tells, when the first array is opened
        self._context: Any = None
        self._open: dict[str, Any] = {}

    # -- what reads cost ------------------------------------------------------------------
    def chunk_bytes(self, key: str) -> int | None:
        """Bytes of one chunk of ``key`` (what any read of it decodes at least), or None when
        Orbax's metadata does not say."""
        spec = self.specs[key]
        if spec.chunk is None or len(spec.chunk) != len(spec.shape):
            return None
        return math.prod(min(c, n) for c, n in zip(spec.chunk, spec.shape)) * spec.dtype.itemsize

    def decoded(self, key: str, boxes: Iterable[Box]) -> int | None:
        """Elements of ``key`` that reading the regions ``boxes`` one after another decodes
        (a chunk once per region it meets), or None when Orbax's metadata gives no chunks."""
        if self.chunk_bytes(key) is None:
            return None
        chunk = self._chunk(key)
        return sum(footprint(box, chunk) for box in boxes)

    # -- reading ----------------------------------------------------------------------------
    def read(self, keys: Iterable[str], budget: int) -> dict[str, np.ndarray]:
        """The arrays ``keys``, whole: those that fit ``budget`` (their chunks' bytes) read
        together, each bigger one by pieces of about ``budget`` into its array.

        Raises:
            StoreError: tensorstore cannot open or read one.
            CorruptCheckpointError: one is not the shape and dtype Orbax's metadata says.
        """
        out: dict[str, np.ndarray] = {}
        pending: list[tuple[str, Any]] = []
        for key in keys:
            whole = tuple((0, n) for n in self.specs[key].shape)
            if len(pieces(whole, self._chunk(key), self.specs[key].dtype.itemsize, budget)) > 1:
                out[key] = self.read_box(key, whole, budget)
            else:
                pending.append((key, self._guard(key, lambda k=key: self._store(k).read())))
        for key, future in pending:
            out[key] = self._checked(key, self._guard(key, future.result), self.specs[key].shape)
        return out

    def read_box(self, key: str, box: Box, budget: int) -> np.ndarray:
        """The region ``box`` (``((start, stop), ..)``) of ``key``, read by pieces of whole
        chunks of about ``budget`` bytes (at least one chunk) into one array: bit for bit as
        saved.

        Raises:
            StoreError, CorruptCheckpointError: as ``read``.
            TargetMismatchError: ``box`` is not a region of the array.
        """
        spec = self.specs[key]
        if len(box) != len(spec.shape) or any(
            not 0 <= a <= b <= n for (a, b), n in zip(box, spec.shape)
        ):
            raise TargetMismatchError(f"{self._where}: {key!r} of {spec.shape} has no region {box}")
        shape = tuple(b - a for a, b in box)
        parts = pieces(box, self._chunk(key), spec.dtype.itemsize, budget)
        if len(parts) == 1:
            return self._checked(key, self._region(key, box), shape)
        import tensorstore as ts

        out = np.empty(shape, spec.dtype)
        into = ts.array(out, copy=False, write=True)  # decoded chunks copied straight in
        store = self._store(key)
        for part in parts:
            at = tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(part, box))
            index = tuple(slice(a, b) for a, b in part)
            self._guard(key, lambda at=at, index=index: into[at].write(store[index]).result())
        return out

    def close(self) -> None:
        self._open.clear()
        self._context = None

    # -- helpers ----------------------------------------------------------------------------
    def _chunk(self, key: str) -> tuple[int, ...]:
        spec = self.specs[key]
        if self.chunk_bytes(key) is None:  # unknown: the array as one chunk (never split)
            return spec.shape
        assert spec.chunk is not None
        return tuple(max(1, c) for c in spec.chunk)

    def _region(self, key: str, box: Box) -> np.ndarray:
        store = self._store(key)
        index = tuple(slice(a, b) for a, b in box)
        return self._guard(key, lambda: store[index].read().result())

    def _store(self, key: str) -> Any:
        """``key`` opened as Orbax opens it to restore it, checked against its metadata."""
        store = self._open.get(key)
        if store is not None:
            return store
        ocp, spec = self._ocp, self.specs[key]
        if self._context is None:
            self._use_ocdbt = bool(self._guard(key, self._is_ocdbt))
            self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)
        info = ocp.type_handlers.ParamInfo(
            name=spec.name, parent_dir=self._dir, is_ocdbt_checkpoint=self._use_ocdbt,
            use_zarr3=self._use_zarr3, ts_context=self._context,
        )  # fmt: skip
        json_spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
        import tensorstore as ts  # orbax-checkpoint's own reader: installed with it

        store = self._guard(
            key, lambda: ts.open(ts.Spec(json_spec), open=True, context=self._context).result()
        )
        shape, dtype = tuple(int(n) for n in store.shape), np.dtype(store.dtype.numpy_dtype)
        origin = tuple(int(n) for n in store.origin)
        if shape != spec.shape or dtype != spec.dtype or any(origin):
            raise CorruptCheckpointError(
                f"{self._where}: {key!r} is stored as {shape} {dtype}, Orbax's metadata says "
                f"{spec.shape} {spec.dtype}: the checkpoint is inconsistent; restore it with "
                "orbax-checkpoint to see which is right"
            )
        self._open[key] = store
        return store

    def _is_ocdbt(self) -> bool:
        return bool(self._ocp.type_handlers.is_ocdbt_checkpoint(self._dir))

    def _guard(self, key: str, call: Any) -> Any:
        try:
            return call()
        except CorruptCheckpointError:
            raise
        except Exception as e:  # tensorstore's own errors, whatever their class
            text = str(e).strip().splitlines()
            raise StoreError(
                f"{self._where}: tensorstore could not read {key!r}: {type(e).__name__}: "
                f"{text[0][:300] if text else ''}"
            ) from e

    def _checked(self, key: str, a: Any, shape: tuple[int, ...]) -> np.ndarray:
        a, dtype = np.asarray(a), self.specs[key].dtype
        if a.shape != shape or a.dtype != dtype:
            raise CorruptCheckpointError(
                f"{self._where}: {key!r} read as {a.shape} {a.dtype}, {shape} {dtype} was asked"
            )
        return a


def pieces(box: Box, chunk: tuple[int, ...], itemsize: int, budget: int) -> list[Box]:
    """``box`` cut at chunk edges into pieces whose chunks together hold at most ``budget``
    bytes (a piece within one chunk may hold more: a chunk is the least tensorstore decodes):
    runs of whole chunk rows along the first axis the box spans more than one chunk of, each
    cut again along the next such axis while it is too big."""
    if footprint(box, chunk) * itemsize <= budget:
        return [box]
    for axis, ((a, b), c) in enumerate(zip(box, chunk)):
        if b - a and a // c != (b - 1) // c:
            return [
                p
                for run in _runs(box, axis, chunk, itemsize, budget)
                for p in pieces(run, chunk, itemsize, budget)
            ]
    return [box]


def _runs(box: Box, axis: int, chunk: tuple[int, ...], itemsize: int, budget: int) -> list[Box]:
    """``box`` cut along ``axis`` at chunk edges into runs of as many chunk rows as fit in
    ``budget`` (at least one)."""
    (a, b), c = box[axis], chunk[axis]
    edges = [a, *range((a // c + 1) * c, b, c), b]
    out: list[Box] = []
    lo = 0
    while lo < len(edges) - 1:
        hi = lo + 1
        while hi + 1 < len(edges):
            wider = _with(box, axis, (edges[lo], edges[hi + 1]))
            if footprint(wider, chunk) * itemsize > budget:
                break
            hi += 1
        out.append(_with(box, axis, (edges[lo], edges[hi])))
        lo = hi
    return out


def footprint(box: Box, chunk: tuple[int, ...]) -> int:
    """Elements of the chunks ``box`` touches (what reading it decodes)."""
    if any(b <= a for a, b in box):
        return 0
    return math.prod((-(-b // c) * c) - (a // c) * c for (a, b), c in zip(box, chunk))


def _with(box: Box, axis: int, span: tuple[int, int]) -> Box:
    return (*box[:axis], span, *box[axis + 1 :])
