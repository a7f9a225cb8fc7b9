"""Lazy array operations for conversion functions: each takes and returns ``OutLeaf`` s (or
arrays), and computes nothing until the writer makes the result, so a conversion function
written with them converts a model of any size in about the memory of its largest array.
Conversion code written with numpy works too (an ``OutLeaf`` is made when numpy asks for it),
holding what it makes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from stepsafe import knobs
from stepsafe.convert.buffers import empty
from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.convert.stacking import layer_slices, stacked_leaf
from stepsafe.errors import ConfigError
from stepsafe.format.manifest import Box

__all__ = [
    "as_leaf", "astype", "at", "layers", "put", "reshape", "scale", "stack", "take",
    "transpose",
]  # fmt: skip


def as_leaf(x: Any) -> OutLeaf:
    """``x`` as an ``OutLeaf`` (an array is wrapped, as it is)."""
    if isinstance(x, OutLeaf):
        return x
    a = np.asarray(x)
    return OutLeaf(a.shape, a.dtype, lambda: a)


def transpose(x: Any, axes: tuple[int, ...] | None = None) -> OutLeaf:
    """``np.transpose(x, axes)``, lazily (a Linear weight's [out, in] <-> a kernel's [in, out])."""
    leaf = as_leaf(x)
    order = tuple(reversed(range(len(leaf.shape)))) if axes is None else tuple(axes)
    if sorted(order) != list(range(len(leaf.shape))):
        raise ConfigError(f"transpose axes {order} are not a permutation of {len(leaf.shape)} axes")
    shape = tuple(leaf.shape[a] for a in order)
    box = _through(leaf, lambda b: tuple(b[order.index(a)] for a in range(len(order))),
                   lambda a: np.transpose(a, order))  # fmt: skip
    return OutLeaf(shape, leaf.dtype, lambda: np.transpose(leaf.made(), order), leaf.group, box)


def reshape(x: Any, shape: tuple[int, ...]) -> OutLeaf:
    """``x.reshape(shape)``, lazily."""
    leaf = as_leaf(x)
    try:
        new = np.empty(leaf.shape, np.uint8).reshape(shape).shape  # checks the size now
    except ValueError as e:
        raise ConfigError(f"cannot reshape an array of shape {leaf.shape} to {shape}") from e
    if leaf.box is None:
        return OutLeaf(new, leaf.dtype, lambda: leaf.made().reshape(new), leaf.group)
    old = tuple(leaf.shape)

    def box(b: Box) -> np.ndarray:
        return _reshaped_region(leaf, old, new, tuple(b))

    return OutLeaf(new, leaf.dtype, lambda: leaf.made().reshape(new), leaf.group, box)


def astype(x: Any, dtype: Any) -> OutLeaf:
    """``x.astype(dtype)``, lazily."""
    leaf = as_leaf(x)
    dt = np.dtype(dtype)
    box = _through(leaf, lambda b: b, lambda a: _cast(a, dt))
    return OutLeaf(leaf.shape, dt, lambda: _cast(leaf.made(), dt), leaf.group, box)


def _cast(a: np.ndarray, dt: np.dtype) -> np.ndarray:
    """``a.astype(dt)``, into a reused buffer on a pipeline's thread (``buffers.empty``)."""
    out = empty(a.shape, dt)
    np.copyto(out, a, casting="unsafe")
    return out


def take(x: Any, indices: Any, axis: int = -1) -> OutLeaf:
    """``np.take(x, indices, axis)`` for a permutation ``indices`` of that axis, lazily (e.g.
    rotary embeddings' half-split <-> interleaved layout of a head's features).

    Raises:
        ConfigError: ``x`` has no ``axis``, or ``indices`` is not a permutation of its length.
    """
    leaf = as_leaf(x)
    if not -len(leaf.shape) <= axis < len(leaf.shape):
        raise ConfigError(f"an array of shape {leaf.shape} has no axis {axis} to permute")
    order = np.asarray(indices, dtype=np.int64)
    if order.ndim != 1 or sorted(order.tolist()) != list(range(leaf.shape[axis])):
        raise ConfigError(f"take along axis {axis} of {leaf.shape} needs a permutation of it")
    ax = axis % len(leaf.shape)

    def region(b: Box) -> Box:  # the whole axis: a permutation scatters any range of it
        return (*b[:ax], (0, leaf.shape[ax]), *b[ax + 1 :])

    def box(b: Box) -> np.ndarray:
        return np.take(leaf.region(region(b)), order[b[ax][0] : b[ax][1]], axis=ax)

    return OutLeaf(
        leaf.shape, leaf.dtype, lambda: np.take(leaf.made(), order, axis=axis), leaf.group,
        box if leaf.box is not None else None,
    )  # fmt: skip


def scale(x: Any, factor: float) -> OutLeaf:
    """``x * factor`` in ``x``'s dtype, lazily: computed in float32 (float64 for float64
    arrays) and rounded back once, as MaxText scales its query kernels. Exact, and undone
    exactly by ``1 / factor``, when ``factor`` is a power of two (barring overflow and
    subnormals).

    Raises:
        ConfigError: ``x`` is not a floating array.
    """
    leaf = as_leaf(x)
    dt = np.dtype(leaf.dtype)
    if dt.kind != "f" and dt.name != "bfloat16":
        raise ConfigError(f"scale needs a floating array, not {dt}")
    work = np.dtype(np.float64 if dt == np.float64 else np.float32)

    def scaled(a: np.ndarray) -> np.ndarray:
        return (a.astype(work) * work.type(factor)).astype(dt)

    box = _through(leaf, lambda b: b, scaled)
    return OutLeaf(leaf.shape, dt, lambda: scaled(leaf.made()), leaf.group, box)


def stack(xs: list[Any], axis: int = 0) -> OutLeaf:
    """``np.stack(xs, axis)``, lazily, filling the result one part at a time.

    Raises:
        ConfigError: no parts, parts of different shapes or dtypes, or an axis out of range.
    """
    leaves = [as_leaf(x) for x in xs]
    if not leaves or any((x.shape, x.dtype) != (leaves[0].shape, leaves[0].dtype) for x in leaves):
        raise ConfigError("stack needs one or more parts of one shape and dtype")
    first = leaves[0]
    if not -(len(first.shape) + 1) <= axis <= len(first.shape):
        raise ConfigError(f"stack of {first.shape} parts has no axis {axis}")
    return stacked_leaf(leaves, axis % (len(first.shape) + 1))


def layers(x: Any, axis: int = 0) -> list[OutLeaf]:
    """The slices of ``x`` along ``axis`` (a stacked weight's layers), lazily: made one after
    another when written, so ``x`` is read once for all of them."""
    leaf = as_leaf(x)
    return layer_slices(leaf, axis)


def _through(
    leaf: OutLeaf, region: Callable[[Box], Box], fn: Callable[[np.ndarray], np.ndarray]
) -> Callable[[Box], np.ndarray] | None:
    """A region of the result, made from ``leaf``'s region ``region(box)`` by ``fn``; None when
    ``leaf`` cannot read regions (the result is then made whole)."""
    if leaf.box is None:
        return None
    return lambda b: fn(leaf.region(region(b)))


def _c_strides(shape: tuple[int, ...]) -> list[int]:
    """Elements between neighbours along each axis of a C-ordered array of ``shape``."""
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= size
    return strides[::-1]


def _reshaped_region(leaf: OutLeaf, old: tuple[int, ...], new: tuple[int, ...], b: Box) -> Any:
    """The region ``b`` of ``leaf`` (shape ``old``) reshaped to ``new``: a reshape keeps the
    C order, so the region's elements lie between its first and last one in ``leaf``'s order,
    within one contiguous region of ``leaf`` (single indices on the axes where the two agree,
    the range between them on the next, the rest whole), read and cut. When that region is
    much bigger than ``b`` (``b`` is not contiguous, e.g. a band of columns), ``b`` is halved
    along its first axis of more than one index and each half read so, until it fits: the
    memory of a block stays about a block's."""
    extents = [y - x for x, y in b]
    dtype = np.dtype(leaf.dtype)
    if math.prod(extents) == 0:
        return np.empty(extents, dtype)
    ns, os_ = _c_strides(new), _c_strides(old)
    first = sum(x * st for (x, _), st in zip(b, ns))
    last = sum((y - 1) * st for (_, y), st in zip(b, ns))
    lo = [first // st % n for st, n in zip(os_, old)]
    hi = [last // st % n for st, n in zip(os_, old)]
    k = next((i for i in range(len(old)) if lo[i] != hi[i]), len(old))
    cover = (
        *((lo[i], lo[i] + 1) for i in range(k)),
        *(((lo[k], hi[k] + 1),) if k < len(old) else ()),
        *((0, n) for n in old[k + 1 :]),
    )
    size = math.prod(y - x for x, y in cover) * dtype.itemsize
    wanted = math.prod(extents) * dtype.itemsize
    split = next((i for i, n in enumerate(extents) if n > 1), None)
    if size > max(int(knobs.CONVERT_BLOCK_BYTES), 2 * wanted) and split is not None:
        (x, y), mid = b[split], (b[split][0] + b[split][1]) // 2
        halves = [(*b[:split], (x, mid), *b[split + 1 :]), (*b[:split], (mid, y), *b[split + 1 :])]
        return np.concatenate([_reshaped_region(leaf, old, new, h) for h in halves], axis=split)
    start = sum(x * st for (x, _), st in zip(cover, os_))
    flat = leaf.region(cover).reshape(-1)[first - start : last + 1 - start]
    view = np.lib.stride_tricks.as_strided(
        flat, extents, [st * dtype.itemsize for st in ns], writeable=False
    )
    return view.copy()  # C order; np.ascontiguousarray would make a 0-d view 1-d


def at(tree: Any, path: tuple[str, ...]) -> Any:
    """``tree[path[0]][path[1]]..``: a conversion function's lookup by key path."""
    for key in path:
        tree = tree[key]
    return tree


def put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """``tree[path[0]]..[path[-1]] = value``, making the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
