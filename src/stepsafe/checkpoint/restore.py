"""``restore``: committed checkpoint -> tree, whole or a selected subtree, onto a target."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stepsafe.arrays import is_leaf
from stepsafe.arrays.single_replica import SingleReplica
from stepsafe.checkpoint.casting import check_cast, target_dtype, value_dtype
from stepsafe.checkpoint.locate import locate
from stepsafe.checkpoint.orbax_locate import NOT_STEPSAFE, orbax_instead
from stepsafe.checkpoint.placement import default_sharding, target_sharding
from stepsafe.checkpoint.windows import LeafPlan, restore_in_windows
from stepsafe.errors import TargetMismatchError
from stepsafe.format import CheckpointReader
from stepsafe.storage import Storage, storage_for
from stepsafe.tree import build_plain, check_target_paths, concat, flatten, structure_paths, subtree
from stepsafe.tree import join as join_key

OWN_SHARDS = "own_shards.json"  # the descriptor of one process's shards (own_shards.py)


def open_checkpoint(path: str, storage: Storage | None = None) -> CheckpointReader:
    """A reader of the checkpoint ``path`` designates (see ``checkpoint.locate``), in
    ``storage`` (``path`` in its syntax) or else the one ``storage_for(path)`` names."""
    storage, local = storage_for(str(path)) if storage is None else (storage, str(path))
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


def _restore_value(key: str, value: Any, target: Any, allow_cast: bool) -> Any:
    if target is None or type(target) is type(value):
        return value
    if isinstance(target, (bool, int, float)) and isinstance(value, (bool, int, float)):
        check_cast(key, value_dtype(value), target, allow_cast)
        return _converted(key, value, lambda: type(target)(value))
    if hasattr(target, "shape") and hasattr(target, "dtype"):
        if isinstance(value, str) or tuple(target.shape) != ():
            raise TargetMismatchError(
                f"{key!r}: the checkpoint holds the {type(value).__name__} {value!r}, the target "
                f"an array of shape {tuple(target.shape)}"
            )
        check_cast(key, value_dtype(value), target, allow_cast)
        return _converted(key, value, lambda: place_array(key, np.asarray(value), target))
    raise TargetMismatchError(
        f"{key!r}: the checkpoint holds a {type(value).__name__}, "
        f"the target a {type(target).__name__}"
    )


def _converted(key: str, value: Any, convert: Callable[[], Any]) -> Any:
    """``convert()``, for a cast asked for with ``allow_cast`` that no dtype can hold."""
    try:
        return convert()
    except (OverflowError, ValueError, TypeError) as e:
        raise TargetMismatchError(f"{key!r}: {value!r} cannot be cast to the target ({e})") from e


def place_array(key: str, arr: np.ndarray, target: Any) -> Any:
    """The host array ``arr`` (leaf ``key``) as ``target`` wants it: a Python scalar, a numpy
    array of its dtype, or a ``jax.Array`` on its sharding (JAX's default device without
    one). Dtypes are the caller's to check (``casting.check_cast``)."""
    if isinstance(target, (bool, int, float)):
        if arr.ndim != 0:
            raise TargetMismatchError(
                f"{key!r}: target is a scalar, checkpoint has shape {arr.shape}"
            )
        return type(target)(arr.astype(target_dtype(target, arr.dtype)).item())
    if isinstance(target, np.generic):
        return arr.astype(target.dtype)[()]
    if isinstance(target, np.ndarray) or not _wants_jax(target):
        return arr.astype(np.dtype(target.dtype), copy=False)
    from stepsafe.arrays.jax_arrays import assemble, local_boxes

    sharding = getattr(target, "sharding", None)
    if sharding is None:
        sharding = default_sharding(key, None)  # an inline value: no saved sharding
    regions = {  # a 0-d array: every box is the whole of it
        box: arr[tuple(slice(lo, hi) for lo, hi in box)] if box else arr
        for box in local_boxes(arr.shape, sharding)
    }
    return assemble(arr.shape, np.dtype(target.dtype), sharding, regions)


def _wants_jax(target: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(target, jax.Array | jax.ShapeDtypeStruct)


AS_SAVED = LeafPlan(lambda: None, lambda _: None)  # ``plan_leaf``: the array as saved, on the host


def plan_leaf(reader: CheckpointReader, key: str, target: Any, allow_cast: bool) -> LeafPlan:
    """Check leaf ``key`` against ``target`` (nothing is read) and say how to restore it:
    ``AS_SAVED`` when the leaf is the saved array itself in host memory (no target, or a host
    target of the saved dtype), which ``_restore_all`` reads in one batch; else a plan."""
    manifest = reader.manifest
    if key in manifest.values:
        value = _restore_value(key, manifest.values[key], target, allow_cast)
        return LeafPlan(lambda: None, lambda _: value)
    entry = manifest.arrays[key]
    shape = () if isinstance(target, (bool, int, float)) else getattr(target, "shape", None)
    if target is not None and shape is not None and tuple(shape) != entry.shape:
        raise TargetMismatchError(
            f"{key!r}: the checkpoint's array has shape {entry.shape}, the target wants "
            f"{tuple(shape)}"
        )
    if isinstance(target, str):
        raise TargetMismatchError(f"{key!r}: the checkpoint holds an array, the target a str")
    if target is not None:
        check_cast(key, entry.dtype, target, allow_cast)
    if _wants_jax(target):
        from stepsafe.arrays.jax_arrays import assemble, local_boxes

        sharding = target_sharding(key, target, entry.sharding)
        dtype = np.dtype(target.dtype)
        return LeafPlan(
            lambda: reader.plan(key, local_boxes(entry.shape, sharding)),
            lambda read: assemble(entry.shape, dtype, sharding, read.outs),
            entry.nbytes,
        )
    if target is None or (
        not isinstance(target, (bool, int, float, np.generic))
        and np.dtype(target.dtype) == entry.dtype
    ):
        return AS_SAVED
    return LeafPlan(
        lambda: reader.plan(key),
        lambda read: place_array(key, read.outs.popitem()[1], target),
    )


def restore(
    path: str,
    target: Any = None,
    *,
    select: str | Sequence[Any] | None = None,
    verify: bool = True,
    allow_cast: bool = False,
    single_replica: SingleReplica | None = None,
) -> Any:
    """Read a committed checkpoint back as a tree.

    Args:
        path (`str`): a step directory, its ``items/`` child, or a run directory (its latest
            step), local or an ``s3://`` / ``gs://`` URL. A checkpoint Orbax wrote (MaxText's:
            ``<step>/items/`` or ``<step>/default/``) is read through orbax-checkpoint (the
            extra ``stepsafe[orbax]``), when complete by Orbax's rules; ``verify`` does not
            apply to it (it has no stepsafe checksums) and ``single_replica`` is refused.
        target (`Any`, *optional*): a tree like the saved one (or like the selected subtree)
            whose leaves say what to make of each leaf: a numpy array or scalar (that dtype),
            a ``jax.Array`` or ``jax.ShapeDtypeStruct`` (that dtype and sharding), a Python
            bool/int/float, or None (as saved). Its containers (NamedTuples, dataclasses, optax
            states) are rebuilt. Without a target: numpy arrays in dicts, lists and tuples;
            NamedTuples and other custom nodes come back as dicts; a typed JAX PRNG key as
            ``{impl name: key data}`` (see ``stepsafe.tree.jax_keys``). A
            ``jax.ShapeDtypeStruct`` without a sharding lands on JAX's default device in a
            single process; under several JAX processes it gets the sharding the array was
            saved with (its mesh rebuilt from ``jax.devices()`` in order, when their number
            is the saved mesh's size), and otherwise ``TargetMismatchError``: one device per
            process would silently hold the whole array.
        select (`str` or sequence, *optional*): a key path (``"params"``) or sequence of
            keys; only that subtree's bytes are read.
        verify (`bool`, defaults to `True`): check every chunk's checksum.
        allow_cast (`bool`, defaults to `False`): cast to the target's dtype even where
            values may change. Without it only casts that cannot change a value happen:
            ``np.can_cast(saved, wanted, "safe")`` (int32 -> int64, float32 -> float64,
            bfloat16 -> float32); a Python int target takes any integer, a Python float is
            float64; an inline Python int counts as the smallest integer dtype that holds it.
            Casting float32 parameters to bfloat16 on purpose (as MaxText does) needs
            ``allow_cast=True``.
        single_replica (`SingleReplica`, *optional*): under several JAX processes, only the
            processes of replica 0 along ``single_replica.replica_axis_index`` (the
            data-parallel axis) read data bytes; the others get the arrays over a JAX
            collective, and host leaves from one of those processes. Every process must call
            ``restore`` alike. See ``stepsafe.arrays.single_replica`` for its rules: JAX
            targets need a NamedSharding whose spec leaves the replica axis out.

    Returns:
        `Any`: the tree; with ``select``, only that subtree.

    Raises:
        TargetMismatchError: the target's keys, shapes or dtypes do not fit the checkpoint
            (checked for every leaf before any data is read), or ``select`` is not in it, or
            a target leaf without a sharding under several processes has no saved sharding
            that fits this job's devices.
        CheckpointNotFoundError: ``path`` holds no checkpoint.
        IncompleteCheckpointError: the checkpoint at ``path`` was never committed.
        CorruptCheckpointError: bytes on storage are not what the checkpoint says
            (``ChecksumMismatchError``, ``TruncatedDataError``, ``ManifestError``).
        UnsupportedFormatError: a newer (or foreign) format version, or an Orbax checkpoint
            without orbax-checkpoint installed.

    Example:

    ```python
    import numpy as np
    import stepsafe

    state = stepsafe.restore("ckpt/1000")  # numpy arrays, as saved
    params = stepsafe.restore("ckpt/1000", select="params")  # reads only that subtree
    # onto a target: its dtypes (and shardings, for jax.ShapeDtypeStruct leaves)
    w = stepsafe.restore("ckpt/1000", {"w": np.zeros((4, 4), np.float32)}, select="params")
    ```
    """
    try:
        reader = open_checkpoint(path)
    except NOT_STEPSAFE as e:  # perhaps an Orbax checkpoint (MaxText's): read through Orbax
        from stepsafe.checkpoint.orbax_restore import restore_orbax

        found = orbax_instead(str(path), e)
        return restore_orbax(found, target, select, allow_cast, single_replica)
    with reader:
        if OWN_SHARDS in reader.record.extra_files:  # a local-tier step of one process
            from stepsafe.checkpoint.own_shards import restore_own

            if select is not None:
                raise TargetMismatchError(
                    f"{reader.path} holds one process's shards (a local-tier step), which "
                    "restore whole only: restore without select"
                )
            return restore_own(reader.storage, reader.path, target)
        return restore_from(reader, target, select, verify, allow_cast, single_replica)


def restore_from(
    reader: CheckpointReader,
    target: Any,
    select: Any = None,
    verify: bool = True,
    allow_cast: bool = False,
    single_replica: SingleReplica | None = None,
) -> Any:
    """``restore`` from an open reader: for callers that hold their own storage (a
    ``CheckpointManager``, with its transfer budget), so that the public ``restore`` takes
    paths only."""
    prefix = select_prefix(select)
    try:
        node = subtree(reader.manifest.structure, prefix)
    except KeyError as e:
        raise TargetMismatchError(
            f"select={select!r} is not in checkpoint {reader.path}: {e.args[0]}"
        ) from e
    if target is None:
        keys = structure_paths(node, prefix)
        nones = [None] * len(keys)
        leaves = _restore_leaves(reader, keys, nones, verify, False, single_replica)
        values = dict(zip(keys, leaves))
        return build_plain(node, values.__getitem__, prefix)
    flat = flatten(target, is_leaf=is_target_leaf)
    keys = [concat(prefix, p) for p in flat.paths]
    check_target_paths(structure_paths(node, prefix), keys)
    return flat.rebuild(
        _restore_leaves(reader, keys, flat.leaves, verify, allow_cast, single_replica)
    )


def _restore_leaves(
    reader: CheckpointReader,
    keys: list[str],
    targets: list[Any],
    verify: bool,
    allow_cast: bool,
    single_replica: SingleReplica | None,
) -> list:
    """``_restore_all``, or with ``single_replica`` the same leaves with data read only by
    replica 0's processes (``stepsafe.arrays.single_replica``, which JAX is loaded for)."""
    if single_replica is None:
        return _restore_all(reader, keys, targets, verify, allow_cast)
    from stepsafe.arrays.single_replica import LeafReader, restore_single_replica

    arrays = reader.manifest.arrays

    def saved(key: str) -> tuple[tuple[int, ...], np.dtype] | None:
        entry = arrays.get(key)
        return None if entry is None else (entry.shape, entry.dtype)

    def check(ks: list[str], ts: list[Any]) -> None:
        for k, t in zip(ks, ts):
            plan_leaf(reader, k, t, allow_cast)

    def sharding(key: str, target: Any) -> Any:
        return target_sharding(key, target, getattr(arrays.get(key), "sharding", None))

    source = LeafReader(
        saved=saved,
        sharding=sharding,
        check=check,
        read=lambda ks, ts: _restore_all(reader, ks, ts, verify, allow_cast),
        finish_host=lambda key, a, t: a if t is None else place_array(key, a, t),
    )
    return restore_single_replica(source, keys, targets, single_replica)


def _restore_all(
    reader: CheckpointReader, keys: list[str], targets: list[Any], verify: bool, allow_cast: bool
) -> list:
    """Check every leaf against the checkpoint first (nothing is read before), then read them:
    arrays restored as saved into host memory in one batch, the others a window at a time."""
    plans = [plan_leaf(reader, k, t, allow_cast) for k, t in zip(keys, targets)]
    saved = [i for i, p in enumerate(plans) if p is AS_SAVED]
    if not saved:
        return restore_in_windows(reader, keys, plans, verify)
    rest = [i for i, p in enumerate(plans) if p is not AS_SAVED]
    reader.check_files_of([keys[i] for i in rest])  # theirs too, before the batch reads
    out: list[Any] = [None] * len(keys)
    for i, array in zip(saved, reader.read_arrays([keys[i] for i in saved], verify)):
        out[i] = array
    if rest:
        made = restore_in_windows(reader, [keys[i] for i in rest], [plans[i] for i in rest], verify)
        for i, leaf in zip(rest, made):
            out[i] = leaf
    return out
