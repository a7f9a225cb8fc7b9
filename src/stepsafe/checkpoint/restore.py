"""``restore``: committed checkpoint -> tree, whole or a selected subtree, onto a target."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepsafe.arrays import is_leaf
from stepsafe.checkpoint.locate import locate
from stepsafe.errors import TargetMismatchError
from stepsafe.format import CheckpointReader
from stepsafe.format.regions import Region
from stepsafe.storage import storage_for
from stepsafe.tree import build_plain, check_target_paths, concat, flatten, structure_paths, subtree
from stepsafe.tree import join as join_key

WINDOW_BYTES = 2 << 30  # bytes of arrays read as one batch: bounds transient host memory


def open_checkpoint(path: str) -> CheckpointReader:
    storage, local = storage_for(str(path))
    return CheckpointReader(storage, locate(storage, local))


def select_prefix(select: str | Sequence[Any] | None) -> str:
    """``"params/dense"`` or ``("params", "dense")`` -> an escaped key path."""
    if select is None:
        return ""
    if isinstance(select, str):
        return select.strip("/")
    prefix = ""
    for seg in select:
        prefix = join_key(prefix, str(seg))
    return prefix


def is_target_leaf(x: Any) -> bool:
    """Leaves of a target: anything saveable, plus shape/dtype descriptions (ShapeDtypeStruct)."""
    return is_leaf(x) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, dict | list | tuple)
    )


def _restore_value(key: str, value: Any, target: Any) -> Any:
    if target is None or type(target) is type(value):
        return value
    if isinstance(target, (bool, int, float)) and isinstance(value, (bool, int, float)):
        return type(target)(value)
    if hasattr(target, "shape") and hasattr(target, "dtype"):
        if isinstance(value, str) or tuple(target.shape) != ():
            raise TargetMismatchError(
                f"{key!r}: the checkpoint holds the {type(value).__name__} {value!r}, the target "
                f"an array of shape {tuple(target.shape)}"
            )
        return _restore_array_host(key, np.asarray(value), target)
    raise TargetMismatchError(
        f"{key!r}: the checkpoint holds a {type(value).__name__}, "
        f"the target a {type(target).__name__}"
    )


def _restore_array_host(key: str, arr: np.ndarray, target: Any) -> Any:
    if isinstance(target, (bool, int, float)):
        if arr.ndim != 0:
            raise TargetMismatchError(
                f"{key!r}: target is a scalar, checkpoint has shape {arr.shape}"
            )
        return type(target)(arr.item())
    if isinstance(target, np.generic):
        return arr.astype(target.dtype)[()]
    if isinstance(target, np.ndarray) or not _wants_jax(target):
        return arr.astype(np.dtype(target.dtype), copy=False)
    from stepsafe.arrays.jax_arrays import assemble, local_boxes

    sharding = getattr(target, "sharding", None)
    boxes = local_boxes(arr.shape, sharding)  # a 0-d array: every box is the whole of it
    return assemble(arr.shape, np.dtype(target.dtype), sharding, dict.fromkeys(boxes, arr))


def _target_sharding(target: Any) -> Any:
    """The sharding to restore onto; None (JAX's default placement, uncommitted) when the target
    is an uncommitted array, so that it can still be combined with arrays on other devices."""
    if getattr(target, "committed", True) is False:
        return None
    return getattr(target, "sharding", None)


def _wants_jax(target: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(target, jax.Array | jax.ShapeDtypeStruct)


@dataclass
class LeafPlan:
    """One leaf of a restore, checked against the checkpoint: the regions it reads (planned
    only when its window comes, so that nothing is allocated early) and what makes the leaf
    of them once read."""

    regions: Callable[[], list[Region]]
    finish: Callable[[list[Region]], Any]


def plan_leaf(reader: CheckpointReader, key: str, target: Any) -> LeafPlan:
    manifest = reader.manifest
    if key in manifest.values:
        value = manifest.values[key]
        return LeafPlan(list, lambda _: _restore_value(key, value, target))
    entry = manifest.arrays[key]
    if target is not None and hasattr(target, "shape") and tuple(target.shape) != entry.shape:
        raise TargetMismatchError(
            f"{key!r}: the checkpoint's array has shape {entry.shape}, the target wants "
            f"{tuple(target.shape)}"
        )
    if isinstance(target, str):
        raise TargetMismatchError(f"{key!r}: the checkpoint holds an array, the target a str")
    if _wants_jax(target):
        from stepsafe.arrays.jax_arrays import assemble, local_boxes

        sharding = _target_sharding(target)
        dtype = np.dtype(target.dtype)
        return LeafPlan(
            lambda: [reader.plan(key, box) for box in local_boxes(entry.shape, sharding)],
            lambda rs: assemble(entry.shape, dtype, sharding, {r.box: r.out for r in rs}),
        )
    if target is None:
        return LeafPlan(lambda: [reader.plan(key)], lambda rs: rs[0].out)
    return LeafPlan(
        lambda: [reader.plan(key)], lambda rs: _restore_array_host(key, rs[0].out, target)
    )


def restore(
    path: str,
    target: Any = None,
    *,
    select: str | Sequence[Any] | None = None,
    verify: bool = True,
) -> Any:
    """Read a committed checkpoint back as a tree.

    ``target``: a tree like the saved one (or like the selected subtree) whose leaves say what
    to make of each array: a numpy array or scalar (that dtype), a ``jax.Array`` or
    ``jax.ShapeDtypeStruct`` (that dtype and sharding), or None (as saved). Its containers
    (NamedTuples, dataclasses, optax states) are rebuilt. Without a target, numpy arrays in
    dicts, lists and tuples; NamedTuples and other custom nodes come back as dicts.
    ``select``: a key path (``"params"``) or sequence of keys; only that subtree's bytes are read.
    ``verify``: check every chunk's checksum (default).
    """
    with open_checkpoint(path) as reader:
        return _restore_from(reader, target, select, verify)


def _restore_from(reader: CheckpointReader, target: Any, select: Any, verify: bool) -> Any:
    prefix = select_prefix(select)
    try:
        node = subtree(reader.manifest.structure, prefix)
    except KeyError as e:
        raise TargetMismatchError(
            f"select={select!r} is not in checkpoint {reader.path}: {e.args[0]}"
        ) from e
    if target is None:
        keys = structure_paths(node, prefix)
        values = dict(zip(keys, _restore_all(reader, keys, [None] * len(keys), verify)))
        return build_plain(node, values.__getitem__, prefix)
    flat = flatten(target, is_leaf=is_target_leaf)
    keys = [concat(prefix, p) for p in flat.paths]
    check_target_paths(structure_paths(node, prefix), keys)
    return flat.rebuild(_restore_all(reader, keys, flat.leaves, verify))


def _restore_all(
    reader: CheckpointReader, keys: list[str], targets: list[Any], verify: bool
) -> list:
    """Restore leaves a window at a time, in the order their bytes lie in the data files: a
    window's reads go to the storage as one batch (neighbours merge into large requests on
    buckets), and a window's staging buffers and host copies of device arrays are freed
    before the next window is read."""
    arrays = reader.manifest.arrays

    def position(i: int) -> tuple[str, int]:
        entry = arrays.get(keys[i])
        first = next((c for s in entry.shards for c in s.chunks), None) if entry else None
        return (first.file, first.offset) if first else ("", 0)

    plans = [plan_leaf(reader, k, t) for k, t in zip(keys, targets)]  # every check first
    out: list[Any] = [None] * len(keys)
    window: list[int] = []
    size = 0
    for i in [*sorted(range(len(keys)), key=position), None]:
        nbytes = arrays[keys[i]].nbytes if i is not None and keys[i] in arrays else 0
        if window and (i is None or size + nbytes > WINDOW_BYTES):
            regions = {j: plans[j].regions() for j in window}
            reader.read([r for rs in regions.values() for r in rs], verify)
            for j, rs in regions.items():
                out[j] = plans[j].finish(rs)
            window, size = [], 0
        if i is not None:
            window.append(i)
            size += nbytes
    return out
