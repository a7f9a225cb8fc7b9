"""``restore`` and ``metadata`` of an Orbax checkpoint: the same answers as for stepsafe's own
(numpy without a target; onto a target its dtypes by the lossless-cast rule, its shardings,
its containers), read through orbax-checkpoint a window of leaves at a time, so that only the
selected subtree is read and a restore onto devices holds about one window on the host."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stepsafe import knobs
from stepsafe.checkpoint.casting import check_cast
from stepsafe.checkpoint.inspect import ArrayMetadata, CheckpointInfo
from stepsafe.checkpoint.orbax_locate import OrbaxStep
from stepsafe.checkpoint.orbax_read import OrbaxCheckpoint, open_orbax
from stepsafe.checkpoint.restore import (
    _restore_value,
    is_target_leaf,
    place_array,
    select_prefix,
)
from stepsafe.errors import ConfigError, TargetMismatchError
from stepsafe.tree import build_plain, check_target_paths, concat, flatten, structure_paths, subtree


def restore_orbax(
    found: OrbaxStep,
    target: Any = None,
    select: str | Sequence[Any] | None = None,
    allow_cast: bool = False,
    single_replica: Any = None,
) -> Any:
    """``stepsafe.restore`` of the Orbax step ``found`` (see there for the arguments).

    Raises:
        ConfigError: ``single_replica`` (not offered for Orbax checkpoints).
        TargetMismatchError: as ``restore``: keys, shapes or lossy casts, checked for every
            leaf before any array is read; ``select`` not in the checkpoint.
        UnsupportedFormatError: orbax-checkpoint is not installed.
        CorruptCheckpointError: Orbax could not read it.
    """
    if single_replica is not None:
        raise ConfigError(
            f"{found.path} is an Orbax checkpoint: single_replica restores only stepsafe's "
            "(convert it first: stepsafe convert)"
        )
    with open_orbax(found) as ckpt:
        return restore_from_orbax(ckpt, target, select, allow_cast)


def restore_from_orbax(
    ckpt: OrbaxCheckpoint, target: Any, select: Any = None, allow_cast: bool = False
) -> Any:
    """``restore_orbax`` from an open checkpoint."""
    prefix = select_prefix(select)
    node = _node(ckpt, prefix, select)
    if target is None:
        keys = structure_paths(node, prefix)
        values = _read_windows(ckpt, keys, [None] * len(keys), allow_cast)
        return build_plain(node, dict(zip(keys, values)).__getitem__, prefix)
    flat = flatten(target, is_leaf=is_target_leaf)
    keys = [concat(prefix, p) for p in flat.paths]
    check_target_paths(structure_paths(node, prefix), keys)
    for key, t in zip(keys, flat.leaves):  # every leaf checked before a byte is read
        _check(ckpt, key, t, allow_cast)
    return flat.rebuild(_read_windows(ckpt, keys, flat.leaves, allow_cast))


def metadata_orbax(found: OrbaxStep, select: str | Sequence[Any] | None = None) -> Any:
    """``stepsafe.metadata`` of an Orbax step: ``ArrayMetadata`` leaves from Orbax's metadata
    (no array bytes read); inline values (Python scalars, strings) as saved."""
    with open_orbax(found) as ckpt:
        prefix = select_prefix(select)
        node = _node(ckpt, prefix, select)
        keys = structure_paths(node, prefix)
        values = ckpt.read([k for k in keys if k not in ckpt.arrays])

        def leaf(key: str) -> Any:
            if key in ckpt.arrays:
                shape, dtype = ckpt.arrays[key]
                return ArrayMetadata(shape, dtype, ckpt.nbytes(key))
            return values[key]

        return build_plain(node, leaf, prefix)


def info_orbax(found: OrbaxStep) -> CheckpointInfo:
    """``stepsafe.info`` of an Orbax step: its ``_CHECKPOINT_METADATA``'s timestamps and custom
    metadata, and totals from Orbax's metadata (``format_version`` 0: not stepsafe's)."""
    with open_orbax(found) as ckpt:
        return info_of(ckpt)


def info_of(ckpt: OrbaxCheckpoint) -> CheckpointInfo:
    record = ckpt.found.record
    return CheckpointInfo(
        path=ckpt.path,
        step=ckpt.step,
        init_timestamp_nsecs=_int(record.get("init_timestamp_nsecs")) or 0,
        commit_timestamp_nsecs=_int(record.get("commit_timestamp_nsecs")),
        format_version=0,
        save_id="",
        custom_metadata=ckpt.custom_metadata,
        nbytes=sum(ckpt.nbytes(k) for k in ckpt.arrays),
        num_arrays=len(ckpt.arrays),
        files={},
        format=_format(ckpt),
    )


def _format(ckpt: OrbaxCheckpoint) -> str:
    item = ckpt.found.item_name
    zarr = "zarr3" if ckpt.use_zarr3 else "zarr2"
    return f"Orbax ({f'item {item}, ' if item else ''}{zarr})"


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _node(ckpt: OrbaxCheckpoint, prefix: str, select: Any) -> Any:
    try:
        return subtree(ckpt.structure, prefix)
    except KeyError as e:
        raise TargetMismatchError(
            f"select={select!r} is not in checkpoint {ckpt.found.item}: {e.args[0]}"
        ) from e


def _check(ckpt: OrbaxCheckpoint, key: str, target: Any, allow_cast: bool) -> None:
    if key not in ckpt.arrays or target is None:
        return
    if isinstance(target, str):
        raise TargetMismatchError(f"{key!r}: the checkpoint holds an array, the target a str")
    shape, dtype = ckpt.arrays[key]
    want = () if isinstance(target, bool | int | float) else getattr(target, "shape", None)
    if want is not None and tuple(want) != shape:
        raise TargetMismatchError(
            f"{key!r}: the checkpoint's array has shape {shape}, the target wants {tuple(want)}"
        )
    check_cast(key, dtype, target, allow_cast)


def _read_windows(
    ckpt: OrbaxCheckpoint, keys: list[str], targets: list[Any], allow_cast: bool
) -> list[Any]:
    """Each leaf read and made (placed onto its target), a window of about
    ``knobs.WINDOW_BYTES`` of arrays per Orbax restore: a window's host copies are dropped
    once its leaves are placed."""
    out: list[Any] = [None] * len(keys)
    limit = int(knobs.WINDOW_BYTES)
    window: list[int] = []
    size = 0

    def flush() -> None:
        nonlocal window, size
        read = ckpt.read(keys[i] for i in window)
        for i in window:
            out[i] = _made(ckpt, keys[i], read.pop(keys[i]), targets[i], allow_cast)
        window, size = [], 0

    for i, key in enumerate(keys):
        nbytes = ckpt.nbytes(key) if key in ckpt.arrays else 0
        if window and size + nbytes > limit:
            flush()
        window.append(i)
        size += nbytes
    if window:
        flush()
    return out


def _made(ckpt: OrbaxCheckpoint, key: str, value: Any, target: Any, allow_cast: bool) -> Any:
    if key not in ckpt.arrays:
        return _restore_value(key, value, target, allow_cast)
    if target is None:
        return value
    return place_array(key, value, target)
