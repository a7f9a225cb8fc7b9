"""A process's own checkpoint of a many-process state: every shard it holds, for it alone.

A local-tier step (MaxText's emergency checkpoints) must let each process restore itself from
its own disk, with no other process's files: so each process saves every distinct shard its
devices hold (replicas across processes are not deduplicated), as an ordinary one-process
checkpoint of the tree

    {"leaves": [[shard, shard, ...] for an array leaf, or the value of any other leaf]}

plus ``own_shards.json``, an extra file (checksummed in the commit record like every other)
that says which box of which leaf each shard is, the state's structure, and which process of
how many wrote it. Restoring needs the same process index, process count and, per array, a
target whose sharding asks this process only for boxes it saved: a checkpoint of one process's
shards cannot feed another layout, and says so (restore from the persistent tier instead).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from stepsafe.arrays import StagingBuffers, is_array, is_jax_array, is_leaf, start_host_transfers
from stepsafe.checkpoint.restore import OWN_SHARDS, is_target_leaf, open_checkpoint, restore_from
from stepsafe.checkpoint.save import Snapshot, snapshot
from stepsafe.distributed import process_count, process_index
from stepsafe.errors import ManifestError, TargetMismatchError
from stepsafe.format import CommitRecord, write_checkpoint
from stepsafe.format.step_files import read_commit_record, read_extra
from stepsafe.storage import Storage
from stepsafe.tree import build_plain, check_target_paths, flatten

DESCRIPTOR = OWN_SHARDS
KIND = "stepsafe-own-shards"

Box = tuple[tuple[int, int], ...]


def own_snapshot(
    state: Any, *, copy: bool, staging: StagingBuffers | None = None
) -> tuple[Snapshot, bytes]:
    """This process's shards of ``state`` captured (``copy``: independent of the caller's
    buffers, as an async save needs) and the descriptor that says what they are.

    Raises:
        UnsupportedLeafError: a leaf, key or nesting depth that restore could not read back.
    """
    flat = flatten(state, is_leaf=is_leaf)
    leaves: list[Any] = []
    arrays: dict[str, Any] = {}
    for i, x in enumerate(flat.leaves):
        if is_jax_array(x):
            from stepsafe.arrays.jax_arrays import box_of, describe_sharding, mesh_device_ids

            shape = tuple(x.shape)
            held: dict[Box, Any] = {}
            for s in x.addressable_shards:
                held.setdefault(box_of(s.index, shape), s.data)
            leaves.append(list(held.values()))
            arrays[str(i)] = {
                "shape": list(shape),
                "boxes": [list(map(list, b)) for b in held],
                "sharding": describe_sharding(x.sharding),  # where it lay: promotion puts
                "devices": mesh_device_ids(x.sharding),  # it back there to write it whole
            }
        elif is_array(x):
            a = np.asarray(x)
            leaves.append([a])
            arrays[str(i)] = {"shape": list(a.shape), "boxes": [[[0, n] for n in a.shape]]}
        else:
            leaves.append(x)
    descriptor = {
        "kind": KIND,
        "process_index": process_index(),
        "process_count": process_count(),
        "structure": flat.structure,
        "paths": flat.paths,
        "arrays": arrays,
    }
    snap = snapshot({"leaves": leaves}, copy=copy, staging=staging, own=True)
    return snap, json.dumps(descriptor).encode()


def write_own(
    storage: Storage,
    path: str,
    snap: Snapshot,
    record: CommitRecord,
    extra_files: dict[str, bytes],
    file_size: int | None = None,
) -> None:
    """Commit ``snap`` at ``path`` as this process's alone (no other process takes part),
    with ``extra_files`` (the descriptor among them).

    Raises:
        StorageError, CheckpointExistsError: as the storage raised them; nothing committed.
    """
    start_host_transfers(snap.arrays)
    write_checkpoint(
        storage, path, snap.structure, snap.arrays, snap.values,
        record=record, extra_files=extra_files, file_size=file_size,
    )  # fmt: skip


def is_own_shards(storage: Storage, path: str) -> bool:
    """Whether the committed step at ``path`` holds one process's shards (not a whole state)."""
    return DESCRIPTOR in read_commit_record(storage, path).extra_files


def own_shards_of(storage: Storage, path: str) -> tuple[int, int] | None:
    """(process index, process count) of the process whose shards the committed step at
    ``path`` holds; None for a whole state.

    Raises:
        CorruptCheckpointError: the step's record or descriptor is damaged.
    """
    record = read_commit_record(storage, path)
    raw = read_extra(storage, path, DESCRIPTOR, record)
    if raw is None:
        return None
    d = _descriptor(raw, path)
    return d["process_index"], d["process_count"]


def restore_own(storage: Storage, path: str, target: Any, *, as_saved: bool = False) -> Any:
    """The state saved at ``path`` by ``own_snapshot`` + ``write_own``, onto ``target`` (the
    shardings of its ``jax.Array`` / ``ShapeDtypeStruct`` leaves say where each shard goes).
    ``as_saved`` (no ``target``): every array on the devices and sharding it was saved from
    (what promotion to the persistent tier writes from; arrays saved without a mesh come back
    as numpy arrays, which every process holds whole).

    Raises:
        TargetMismatchError: another process index or count, another tree, or a target whose
            sharding asks for boxes this process did not save (another mesh): restore from
            the persistent tier, which holds whole arrays.
        CorruptCheckpointError: the step or its descriptor is damaged.
    """
    record = read_commit_record(storage, path)
    raw = read_extra(storage, path, DESCRIPTOR, record)
    if raw is None:
        raise ManifestError(f"{path} holds no {DESCRIPTOR}: it is not one process's shards")
    d = _descriptor(raw, path)
    here = (process_index(), process_count())
    if (d["process_index"], d["process_count"]) != here:
        raise TargetMismatchError(
            f"{path} holds the shards of process {d['process_index']} of "
            f"{d['process_count']}, and this is process {here[0]} of {here[1]}: a local step "
            "restores only on the same processes and mesh; restore from the persistent tier"
        )
    with open_checkpoint(path, storage) as reader:
        saved = restore_from(reader, None)["leaves"]
    if target is None:
        targets = _saved_targets(d, saved, path) if as_saved else [None] * len(saved)
        values = dict(zip(d["paths"], _leaves(d, saved, targets, path)))
        return build_plain(d["structure"], values.__getitem__)
    flat = flatten(target, is_leaf=is_target_leaf)
    check_target_paths(d["paths"], flat.paths)
    return flat.rebuild(_leaves(d, saved, flat.leaves, path))


def _descriptor(raw: bytes, path: str) -> dict[str, Any]:
    try:
        d = json.loads(raw)
        if d.get("kind") != KIND:
            raise ValueError(f"kind {d.get('kind')!r}")
        for key in ("process_index", "process_count"):
            if type(d[key]) is not int:
                raise ValueError(f"{key} {d[key]!r}")
        if not isinstance(d["paths"], list) or not isinstance(d["arrays"], dict):
            raise ValueError("paths or arrays")
        return d
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"{path}/{DESCRIPTOR} is corrupt ({e})") from e


def _saved_targets(d: dict[str, Any], saved: list[Any], path: str) -> list[Any]:
    """A ``ShapeDtypeStruct`` on the saved mesh for each array saved with one, else None."""
    import jax

    devices = {int(dev.id): dev for dev in jax.devices()}
    out: list[Any] = []
    for i, value in enumerate(saved):
        info = d["arrays"].get(str(i)) or {}
        sharding = info.get("sharding")
        if not sharding or not info.get("devices") or not value:
            out.append(None)
            continue
        try:
            mesh_devices = np.array([devices[int(n)] for n in info["devices"]], dtype=object)
            mesh = jax.sharding.Mesh(
                mesh_devices.reshape(sharding["mesh"]["shape"]), sharding["mesh"]["axis_names"]
            )
            spec = jax.sharding.PartitionSpec(
                *[tuple(e) if isinstance(e, list) else e for e in sharding["spec"]]
            )
            shape = tuple(int(n) for n in info["shape"])
            named = jax.sharding.NamedSharding(mesh, spec)
        except (KeyError, ValueError, TypeError) as e:
            raise ManifestError(f"{path}/{DESCRIPTOR}: leaf {i}'s sharding is bad ({e})") from e
        out.append(jax.ShapeDtypeStruct(shape, value[0].dtype, sharding=named))
    return out


def _leaves(d: dict[str, Any], saved: list[Any], targets: list[Any], path: str) -> list[Any]:
    if len(saved) != len(d["paths"]):
        raise ManifestError(
            f"{path}: {len(saved)} leaves saved, its descriptor lists {len(d['paths'])}"
        )
    out = []
    for i, (key, value, target) in enumerate(zip(d["paths"], saved, targets)):
        info = d["arrays"].get(str(i))
        if info is None:
            out.append(value)
            continue
        try:
            shape = tuple(int(n) for n in info["shape"])
            boxes = [tuple((int(lo), int(hi)) for lo, hi in b) for b in info["boxes"]]
            regions = dict(zip(boxes, value, strict=True))
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(
                f"{path}/{DESCRIPTOR}: leaf {key!r} is described badly ({e})"
            ) from e
        out.append(_place(key, shape, regions, target, path))
    return out


def _place(
    key: str, shape: tuple[int, ...], regions: dict[Box, np.ndarray], target: Any, path: str
) -> Any:
    whole = tuple((0, n) for n in shape)
    want = getattr(target, "shape", None)
    if want is not None and tuple(want) != shape:
        raise TargetMismatchError(
            f"{key!r}: {path} holds shape {shape}, the target wants {tuple(want)}"
        )
    dtype = next(iter(regions.values())).dtype if regions else None
    if target is not None and hasattr(target, "dtype") and np.dtype(target.dtype) != dtype:
        raise TargetMismatchError(
            f"{key!r}: {path} holds {dtype}, the target wants {np.dtype(target.dtype)}: a local "
            "step restores as saved; restore from the persistent tier to cast"
        )
    sharding = getattr(target, "sharding", None)
    if (
        sharding is None
        and not is_jax_array(target)
        and type(target).__name__ != "ShapeDtypeStruct"
    ):
        if whole not in regions:
            raise TargetMismatchError(
                f"{key!r}: {path} holds only this process's shards of it; restore with a "
                "target whose leaves have shardings, or from the persistent tier"
            )
        return regions[whole]
    from stepsafe.arrays.jax_arrays import assemble, local_boxes

    missing = [b for b in local_boxes(shape, sharding) if b not in regions]
    if missing:
        raise TargetMismatchError(
            f"{key!r}: the target's sharding asks this process for box {missing[0]}, which "
            f"{path} does not hold (it was saved on another mesh): restore from the "
            "persistent tier"
        )
    return assemble(shape, dtype, sharding, regions)
