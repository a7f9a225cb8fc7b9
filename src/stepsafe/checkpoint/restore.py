"""``restore``: committed checkpoint -> tree, whole or a selected subtree, onto a target."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from stepsafe.arrays import is_leaf
from stepsafe.checkpoint.locate import locate
from stepsafe.errors import TargetMismatchError
from stepsafe.format import CheckpointReader
from stepsafe.storage import run_all, storage_for
from stepsafe.tree import build_plain, check_target_paths, concat, flatten, structure_paths, subtree
from stepsafe.tree import join as join_key

PARALLEL_BYTES = 32 << 20  # below this, threads cost more than they save


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
    from stepsafe.arrays.jax_arrays import place

    return place(
        arr.shape, np.dtype(target.dtype), getattr(target, "sharding", None), lambda b: arr
    )


def _target_sharding(target: Any) -> Any:
    """The sharding to restore onto; None (JAX's default placement, uncommitted) when the target
    is an uncommitted array, so that it can still be combined with arrays on other devices."""
    if getattr(target, "committed", True) is False:
        return None
    return getattr(target, "sharding", None)


def _wants_jax(target: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(target, jax.Array | jax.ShapeDtypeStruct)


def restore_leaf(reader: CheckpointReader, key: str, target: Any, verify: bool) -> Any:
    manifest = reader.manifest
    if key in manifest.values:
        return _restore_value(key, manifest.values[key], target)
    entry = manifest.arrays[key]
    if target is not None and hasattr(target, "shape") and tuple(target.shape) != entry.shape:
        raise TargetMismatchError(
            f"{key!r}: the checkpoint's array has shape {entry.shape}, the target wants "
            f"{tuple(target.shape)}"
        )
    if _wants_jax(target):
        from stepsafe.arrays.jax_arrays import place

        return place(
            entry.shape,
            np.dtype(target.dtype),
            _target_sharding(target),
            lambda box: reader.read_box(key, box, verify),
        )
    arr = reader.read_array(key, verify)
    if target is None:
        return arr
    if isinstance(target, str):
        raise TargetMismatchError(f"{key!r}: the checkpoint holds an array, the target a str")
    return _restore_array_host(key, arr, target)


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
    """Restore leaves on a few threads, biggest first: reads and page faults on fresh memory
    release the GIL, so two cores fill buffers about twice as fast as one."""
    arrays = reader.manifest.arrays
    order = sorted(
        range(len(keys)), key=lambda i: -arrays[keys[i]].nbytes if keys[i] in arrays else 0
    )
    out: list[Any] = [None] * len(keys)

    def one(i: int) -> None:
        out[i] = restore_leaf(reader, keys[i], targets[i], verify)

    if sum(arrays[k].nbytes for k in keys if k in arrays) < PARALLEL_BYTES:
        for i in order:
            one(i)
    else:
        run_all(one, order)
    return out
