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
from stepsafe.format.regions import ArrayRead
from stepsafe.storage import storage_for
from stepsafe.tree import build_plain, check_target_paths, concat, flatten, structure_paths, subtree
from stepsafe.tree import join as join_key

# Host bytes of device targets read as one batch (host targets are the result: no bound). The
# bound trades memory for batching. Measured, m95 (1.15 GB) saved unsharded, restored warm onto
# 4 sharded CPU devices, peak RSS of a process that also holds the saved tree: 0.6-0.7 s and
# 3.2 GB at 256 MiB, 3.8 GB at 512 MiB, 4.6 GB unbounded (per-leaf reads before: 1.4 s, 2.9 GB).
WINDOW_BYTES = 256 << 20


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
    """One leaf of a restore, checked against the checkpoint: the array read it needs (planned
    only when its window comes, so that nothing is allocated early; None for a value) and
    what makes the leaf once it is read."""

    plan: Callable[[], ArrayRead | None]
    finish: Callable[[ArrayRead | None], Any]
    transient: int = 0  # host bytes held only until the leaf is made (device targets)


def plan_leaf(reader: CheckpointReader, key: str, target: Any) -> LeafPlan:
    manifest = reader.manifest
    if key in manifest.values:
        value = manifest.values[key]
        return LeafPlan(lambda: None, lambda _: _restore_value(key, value, target))
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
            lambda: reader.plan(key, local_boxes(entry.shape, sharding)),
            lambda read: assemble(entry.shape, dtype, sharding, read.outs),
            entry.nbytes,
        )
    if target is None:
        return LeafPlan(lambda: reader.plan(key), lambda read: read.outs.popitem()[1])
    return LeafPlan(
        lambda: reader.plan(key),
        lambda read: _restore_array_host(key, read.outs.popitem()[1], target),
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
    buckets). Host copies of device arrays count against ``WINDOW_BYTES``, so that a restore
    onto devices never holds much more than that on the host."""
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
        nbytes = plans[i].transient if i is not None else 0
        if window and (i is None or size + nbytes > WINDOW_BYTES):
            _read_window(reader, {j: plans[j] for j in window}, out, verify)
            window, size = [], 0
        if i is not None:
            window.append(i)
            size += nbytes
    return out


def _read_window(
    reader: CheckpointReader, plans: dict[int, LeafPlan], out: list[Any], verify: bool
) -> None:
    """Read the leaves of one window as one batch; each leaf is made as soon as it is read, on
    that I/O thread, and its host buffers are freed then (device targets), so that host
    memory holds only the leaves still in flight."""
    reads = {j: p.plan() for j, p in plans.items()}
    leaf_of = {id(r): j for j, r in reads.items() if r is not None}

    def ready(read: ArrayRead) -> None:
        j = leaf_of[id(read)]
        out[j] = plans[j].finish(read)
        read.outs.clear()  # the leaf holds what it needs of them

    for j in [j for j, r in reads.items() if r is None]:  # values: nothing to read
        out[j] = plans[j].finish(None)
    batch = [r for r in reads.values() if r is not None]
    del reads
    reader.read(batch, verify, ready)
