"""Stacked <-> unstacked layers (MaxText's scanned and unscanned checkpoints).

A scanned model keeps each per-layer weight once, stacked along one axis of length
``num_layers`` (``param_scan_axis``: 1 in MaxText, 0 in stepsafe's demo model), under one key
(``layers``); an unscanned one keeps ``layers_0`` .. ``layers_{L-1}``, each with that axis
removed. Both directions work on trees of ``OutLeaf`` s: unstacking reads each stacked array
once and writes its L slices one after another (``OutLeaf.group``), stacking makes each stacked
array from its L parts; nothing is read until the writer needs it, and one array (with one
slice or part) is held at a time. Round trips are bit
for bit: slicing and stacking move bytes, never change them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from stepsafe import knobs
from stepsafe.arrays import is_leaf
from stepsafe.convert.buffers import empty
from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.errors import ConfigError
from stepsafe.format.manifest import Box
from stepsafe.tree import Flat, flatten


def unstack_layers(tree: Any, *, axis: int = 1, key: str = "layers") -> tuple[Any, int]:
    """``tree`` with every dict entry ``key`` (a stacked subtree) replaced by ``key_0`` ..
    ``key_{L-1}``, in its place; and how many subtrees were unstacked.

    Raises:
        ConfigError: a stacked array has no ``axis``, the arrays of one subtree disagree on
            its length (the layer count) or it is 0, or ``key_<i>`` entries sit beside it.
    """
    pattern = _numbered(key)
    found = 0

    def visit(node: Any, path: str) -> Any:
        nonlocal found
        if isinstance(node, dict):
            out: dict = {}
            for k, v in node.items():
                if k == key and _holds_arrays(v):
                    found += 1
                    if any(pattern.match(str(other)) for other in node):
                        raise ConfigError(
                            f"{path or '/'} holds both {key!r} and {key}_<i>: unstack which?"
                        )
                    layers = _layer_count(v, axis, f"{path}/{k}")
                    stacked = _map(v, lambda x, n=layers: _Stacked(x, axis, n))
                    for i in range(layers):
                        out[f"{key}_{i}"] = _map(stacked, lambda x, i=i: x.slice(i))
                else:
                    out[k] = visit(v, f"{path}/{k}")
            return out
        if isinstance(node, list | tuple):
            return type(node)(visit(v, f"{path}/{i}") for i, v in enumerate(node))
        return node

    return visit(tree, ""), found


def stack_layers(tree: Any, *, axis: int = 1, key: str = "layers") -> tuple[Any, int]:
    """``tree`` with every set of dict entries ``key_0`` .. ``key_{L-1}`` replaced by one
    entry ``key`` whose arrays stack theirs along ``axis``, in ``key_0``'s place; and how many
    sets were stacked.

    Raises:
        ConfigError: the layers are not numbered 0 .. L-1, or differ in keys, shapes or dtypes.
    """
    pattern = _numbered(key)
    found = 0

    def visit(node: Any, path: str) -> Any:
        nonlocal found
        if isinstance(node, dict):
            numbered = {int(m.group(1)): k for k in node if (m := pattern.match(str(k)))}
            if numbered and key in node:
                raise ConfigError(f"{path or '/'} holds both {key!r} and {key}_0..: stack which?")
            if numbered and sorted(numbered) != list(range(len(numbered))):
                last = len(numbered) - 1
                raise ConfigError(
                    f"{path or '/'}: layers {sorted(numbered)} are not numbered 0..{last}"
                )
            out: dict = {}
            for k, v in node.items():
                if numbered and k == numbered[0]:
                    found += 1
                    parts = [node[numbered[i]] for i in range(len(numbered))]
                    out[key] = _stack(parts, axis, f"{path}/{key}")
                elif k not in numbered.values():
                    out[k] = visit(v, f"{path}/{k}")
            return out
        if isinstance(node, list | tuple):
            return type(node)(visit(v, f"{path}/{i}") for i, v in enumerate(node))
        return node

    return visit(tree, ""), found


def layer_slices(leaf: OutLeaf, axis: int) -> list[OutLeaf]:
    """``leaf``'s slices along ``axis`` (its layers), sharing one read of it."""
    if not -len(leaf.shape) <= axis < len(leaf.shape):
        raise ConfigError(f"an array of shape {leaf.shape} has no axis {axis} to take layers along")
    stacked = _Stacked(leaf, axis, leaf.shape[axis])
    return [stacked.slice(i) for i in range(leaf.shape[axis])]


def _numbered(key: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(key)}_(0|[1-9][0-9]*)$")


def _holds_arrays(node: Any) -> bool:
    """A container with an array in it (a stacked subtree), not an array or a plain value."""
    return isinstance(node, dict | list | tuple) and any(
        isinstance(x, OutLeaf) for _, x in _leaves(node, "")
    )


def _map(node: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(node, OutLeaf | _Stacked):
        return fn(node)
    if isinstance(node, dict):
        return {k: _map(v, fn) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return type(node)(_map(v, fn) for v in node)
    return node  # a value: the same in every layer


def _leaves(node: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [x for k, v in node.items() for x in _leaves(v, f"{path}/{k}")]
    if isinstance(node, list | tuple):
        return [x for i, v in enumerate(node) for x in _leaves(v, f"{path}/{i}")]
    return [(path, node)]


def _layer_count(subtree: Any, axis: int, path: str) -> int:
    counts = set()
    for where, leaf in _leaves(subtree, path):
        if isinstance(leaf, OutLeaf):
            if not -len(leaf.shape) <= axis < len(leaf.shape):
                raise ConfigError(
                    f"{where} has shape {leaf.shape}: no axis {axis} to unstack along (the "
                    "layer axis, param_scan_axis: 1 in MaxText, 0 in the demo model)"
                )
            counts.add(leaf.shape[axis])
    if counts == {0}:
        raise ConfigError(f"{path}: its arrays hold 0 layers on axis {axis}: nothing to unstack")
    if len(counts) != 1:
        raise ConfigError(
            f"{path}: its arrays disagree on the length of axis {axis} ({sorted(counts)}): "
            "is that the layer axis?"
        )
    return counts.pop()


class _Stacked:
    """One stacked array, read once for all its layer slices (written one after another: they
    share a ``group``) and dropped after the last: an unstack along a middle axis (MaxText's 1)
    would otherwise read the whole array again for every layer."""

    def __init__(self, leaf: OutLeaf, axis: int, layers: int) -> None:
        self.leaf, self.axis, self.left = leaf, axis % len(leaf.shape), layers
        self.group = f"stacked-{id(self)}"
        self._lock = threading.Lock()
        self._data: np.ndarray | None = None

    def layer(self, i: int) -> np.ndarray:
        """Layer ``i``, copied once out of the stacked array into a C-contiguous array (a
        reused buffer on a pipeline's thread: ``buffers.empty``): row by row, each row's run
        of the layer contiguous, whatever the axis."""
        with self._lock:
            if self._data is None:
                self._data = self.leaf.made()
            data, ax = self._data, self.axis
            out = empty((*data.shape[:ax], *data.shape[ax + 1 :]), data.dtype)
            np.copyto(out, data[(slice(None),) * ax + (slice(i, i + 1),)].reshape(out.shape))
            self.left -= 1
            if self.left == 0:
                self._data = None
            return out

    def slice(self, i: int) -> OutLeaf:
        """Layer ``i``: from the one read of the whole array, or, when the array is too big to
        hold (``CONVERT_BLOCK_BYTES``) and its source reads regions, from its own regions."""
        ax, leaf = self.axis, self.leaf
        shape = (*leaf.shape[:ax], *leaf.shape[ax + 1 :])
        if leaf.box is None or leaf.nbytes <= knobs.CONVERT_BLOCK_BYTES:
            return OutLeaf(shape, leaf.dtype, lambda: self.layer(i), group=self.group)

        def box(b: Box) -> np.ndarray:
            return leaf.region((*b[:ax], (i, i + 1), *b[ax:])).reshape([y - x for x, y in b])

        return OutLeaf(shape, leaf.dtype, lambda: box(tuple((0, n) for n in shape)), box=box)


def _stack(parts: list[Any], axis: int, path: str) -> Any:
    flats = [_flat(p) for p in parts]
    first = flats[0]
    for i, other in enumerate(flats[1:], 1):
        if other.structure != first.structure:
            raise ConfigError(f"{path}: layer {i} differs from layer 0 in its keys or containers")
        for key, a, b in zip(first.paths, first.leaves, other.leaves):
            same = (
                (a.shape, np.dtype(a.dtype)) == (b.shape, np.dtype(b.dtype))
                if isinstance(a, OutLeaf) and isinstance(b, OutLeaf)
                else not isinstance(a, OutLeaf) and not isinstance(b, OutLeaf) and a == b
            )
            if not same:
                raise ConfigError(
                    f"{path}/{key}: layer {i} differs from layer 0 (shape, dtype or value): "
                    "layers stack only when alike"
                )

    def stacked(j: int, leaf: Any) -> Any:
        if not isinstance(leaf, OutLeaf):
            return leaf  # a value, the same in every layer
        if not -(len(leaf.shape) + 1) <= axis <= len(leaf.shape):
            raise ConfigError(
                f"{path}/{first.paths[j]}: layers of shape {leaf.shape} cannot be stacked along "
                f"axis {axis} (the layer axis, param_scan_axis: 1 in MaxText, 0 in the demo model)"
            )
        return stacked_leaf([f.leaves[j] for f in flats], axis % (len(leaf.shape) + 1))

    return first.rebuild([stacked(j, x) for j, x in enumerate(first.leaves)])


def stacked_leaf(layers: list[OutLeaf], ax: int) -> OutLeaf:
    """``layers`` (alike) stacked along axis ``ax`` of the result, made one layer at a time
    into it; by regions, each layer its own region, when every layer reads regions."""
    first = layers[0]
    shape = (*first.shape[:ax], len(layers), *first.shape[ax:])

    def make() -> np.ndarray:  # one layer at a time into the output, each dropped after
        out = np.empty(shape, first.dtype)
        for i, x in enumerate(layers):
            out[(slice(None),) * ax + (i,)] = x.made()
        return out

    if any(x.box is None for x in layers):
        return OutLeaf(shape, first.dtype, make)

    def box(b: Box) -> np.ndarray:  # the layers the region crosses, each its own region
        inner = (*b[:ax], *b[ax + 1 :])
        out = np.empty([y - x for x, y in b], first.dtype)
        for n, i in enumerate(range(*b[ax])):
            out[(slice(None),) * ax + (n,)] = layers[i].region(inner)
        return out

    return OutLeaf(shape, first.dtype, make, box=box)


def _flat(node: Any) -> Flat:
    """A layer's tree flattened with escaped key paths and its containers' structure."""
    return flatten(node, is_leaf=lambda x: isinstance(x, OutLeaf) or is_leaf(x))
