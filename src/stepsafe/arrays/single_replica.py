"""Single-replica restore: the processes of one replica read the checkpoint, the others get the
arrays over a JAX collective (MaxText's ``enable_single_replica_ckpt_restoring``).

Why: under data parallelism every replica holds the same parameters, and N replicas reading the
same bytes cost N times the storage traffic (and a bucket's request rate); the devices'
interconnect is much faster than storage.

How: along the mesh axis ``replica_axis_index`` (the data-parallel axis), the devices at position
0 form the primary replica: a sub-mesh with the same axis names, that axis of size 1. The
processes owning one of its devices restore each array onto the sub-mesh with the target's
partition spec; every other process reads nothing. Then, for a group of leaves, each device gives
its shard under a new leading axis of size r (the replica count), the real shard on primary
devices and zeros elsewhere: a global ``(r,) + shape`` array sharded ``P(replica_axis, *spec)``,
which a jitted sum over that axis, out sharded ``P(*spec)``, turns into the target. The sum works
on bits: floats are viewed as unsigned integers of the same width, bools are or-ed, integers
added (0.0 + -0.0 is 0.0 in floating point, and a NaN's payload need not survive an addition; an
integer x + 0 is x). Groups stay under a per-device byte limit; at the peak a device holds about
twice a group beside the leaves already made.

Host leaves (targets that are not JAX arrays: numpy arrays, Python scalars, None) are read by one
process of the primary replica and broadcast as bytes with ``multihost_utils.broadcast_one_to_all``;
values stored inline in the manifest are metadata, which every process has.

Rules, each a ``TargetMismatchError`` raised on every process before anything is read: a JAX
target needs a ``NamedSharding`` over a concrete mesh, ``replica_axis_index`` must name one of
its axes, and that axis must not be in the partition spec. When there is nothing to broadcast,
the leaf is restored as usual: the replica axis has size 1, or every process owns a device of
the primary replica (a single process always does).

A primary process that fails to read (a corrupt chunk) must not leave the others waiting in a
collective: after each read the processes exchange their outcome through the coordinator (with
its timeout), and every process raises an error of the same class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from stepsafe import knobs
from stepsafe.distributed import process_count, process_index
from stepsafe.distributed.outcomes import as_error, gather_failures
from stepsafe.errors import ConfigError, TargetMismatchError

T = TypeVar("T")


@dataclass(frozen=True)
class SingleReplica:
    """Restore with single-replica reads: only the processes of replica 0 read from storage.

    Args:
        replica_axis_index (`int`, defaults to `0`): the mesh axis along which the arrays are
            replicated (the data-parallel axis); replica 0 is position 0 on it.
        memory_limit_bytes (`int`, *optional*): per-device bytes of one broadcast group; None:
            ``knobs.SINGLE_REPLICA_BROADCAST_BYTES`` (MaxText's 1000 MiB).

    Raises:
        ConfigError: a negative axis index or a limit below 1.
    """

    replica_axis_index: int = 0
    memory_limit_bytes: int | None = None

    def __post_init__(self) -> None:
        if type(self.replica_axis_index) is not int or self.replica_axis_index < 0:
            raise ConfigError(
                f"replica_axis_index must be an int >= 0, got {self.replica_axis_index!r}"
            )
        if self.memory_limit_bytes is not None and self.memory_limit_bytes < 1:
            raise ConfigError(f"memory_limit_bytes must be >= 1, got {self.memory_limit_bytes}")


@dataclass(frozen=True)
class LeafReader:
    """What a restore lends this module (the checkpoint layer sits above this one).

    - ``saved(key)``: the saved array's (shape, dtype); None for a value inline in the manifest.
    - ``sharding(key, target)``: the sharding a JAX target restores onto (one without a
      sharding of its own may get the saved one).
    - ``check(keys, targets)``: raise for any target that does not fit, reading nothing.
    - ``read(keys, targets)``: restore those leaves as usual.
    - ``finish_host(key, array, target)``: what a host target makes of the saved array.
    """

    saved: Callable[[str], tuple[tuple[int, ...], np.dtype] | None]
    sharding: Callable[[str, Any], Any]
    check: Callable[[list[str], list[Any]], None]
    read: Callable[[list[str], list[Any]], list[Any]]
    finish_host: Callable[[str, np.ndarray, Any], Any]


@dataclass
class _Mesh:
    """One target mesh: its replica axis and whether this process reads for it."""

    mesh: Any
    axis: str
    replicas: int
    sub: Any  # the primary replica's sub-mesh
    primary: set[int]  # processes owning one of its devices
    active: bool  # someone lies outside it: broadcast


def restore_single_replica(
    source: LeafReader, keys: list[str], targets: list[Any], options: SingleReplica
) -> list[Any]:
    """The restored leaves for ``keys``, with only replica 0's processes reading data bytes.

    Every process of the job must call this with the same keys and targets (it runs
    collectives).

    Raises:
        TargetMismatchError: a target breaks a rule above (before anything is read), or does
            not fit the checkpoint.
        CorruptCheckpointError, StorageError, ...: a process failed to read; every process
            raises the same class.
        CoordinationError: a process did not report its read within the coordination timeout.
    """
    import jax

    source.check(keys, targets)
    targets = list(targets)
    limit = options.memory_limit_bytes or int(knobs.SINGLE_REPLICA_BROADCAST_BYTES)
    meshes: dict[Any, _Mesh] = {}
    plain: list[int] = []
    host: list[int] = []
    groups: dict[Any, list[int]] = {}
    for i, (key, target) in enumerate(zip(keys, targets)):
        if source.saved(key) is None:
            plain.append(i)  # a value: it is in the manifest
        elif isinstance(target, jax.Array | jax.ShapeDtypeStruct):
            sharding = _check_sharding(key, source.sharding(key, target), options)
            mesh = sharding.mesh
            if mesh not in meshes:
                meshes[mesh] = _layout(mesh, options.replica_axis_index)
            if meshes[mesh].active:
                groups.setdefault(mesh, []).append(i)
                targets[i] = jax.ShapeDtypeStruct(target.shape, target.dtype, sharding=sharding)
            else:
                plain.append(i)
        else:
            host.append(i)
    out: list[Any] = [None] * len(keys)
    if plain:
        _fill(out, plain, _agreed("plain", source.read, _at(keys, plain), _at(targets, plain)))
    me = process_index()
    for mesh, members in groups.items():
        layout = meshes[mesh]
        read = source.read if me in layout.primary else _nothing
        for batch in _batches(members, lambda i: _shard_bytes(targets[i]), limit):
            subs = [_on_sub(jax, targets[i], layout.sub) for i in batch]
            got = _agreed("replica", read, _at(keys, batch), subs)
            _fill(out, batch, _merge(jax, layout, options.replica_axis_index, batch, targets, got))
    if host:
        first = next(iter(meshes.values()), None)
        sender = min(first.primary) if first is not None else 0
        _broadcast_host(source, keys, targets, host, out, sender, limit)
    return out


def _check_sharding(key: str, sharding: Any, options: SingleReplica) -> Any:
    """``sharding``, once it is known to follow the rules."""
    import jax

    axis_index = options.replica_axis_index
    if not isinstance(sharding, jax.sharding.NamedSharding) or not isinstance(
        sharding.mesh, jax.sharding.Mesh
    ):
        got = type(sharding).__name__ if sharding is not None else "no sharding"
        raise TargetMismatchError(
            f"{key!r}: single-replica restore needs a target with a NamedSharding over a mesh "
            f"whose axis {axis_index} holds the replicas, got {got}: give the target one, or "
            "restore without single-replica"
        )
    mesh = sharding.mesh
    if axis_index >= len(mesh.axis_names):
        raise TargetMismatchError(
            f"{key!r}: replica_axis_index={axis_index}, but the target's mesh has the axes "
            f"{tuple(mesh.axis_names)}: pass the index of its data-parallel axis"
        )
    axis = mesh.axis_names[axis_index]
    used = [n for part in sharding.spec for n in (part if isinstance(part, tuple) else (part,))]
    if axis in used:
        raise TargetMismatchError(
            f"{key!r}: the replica axis {axis!r} (replica_axis_index={axis_index}) is in the "
            f"target's partition spec {sharding.spec}: single-replica restore needs arrays "
            "replicated along it; shard them over other axes, or restore without single-replica"
        )
    return sharding


def _layout(mesh: Any, axis_index: int) -> _Mesh:
    import jax

    devices = mesh.devices
    sub_devices = np.take(devices, [0], axis=axis_index)
    primary = {d.process_index for d in sub_devices.flat}
    everyone = {d.process_index for d in devices.flat}
    replicas = devices.shape[axis_index]
    sub = jax.sharding.Mesh(sub_devices, mesh.axis_names, axis_types=mesh.axis_types)
    active = replicas > 1 and bool(everyone - primary)
    return _Mesh(mesh, mesh.axis_names[axis_index], replicas, sub, primary, active)


def _on_sub(jax: Any, target: Any, sub: Any) -> Any:
    """The target moved onto the primary replica's sub-mesh: what primary processes read."""
    sharding = jax.sharding.NamedSharding(sub, target.sharding.spec)
    return jax.ShapeDtypeStruct(target.shape, target.dtype, sharding=sharding)


def _shard_bytes(target: Any) -> int:
    try:
        shape = target.sharding.shard_shape(tuple(target.shape))
    except ValueError:  # uneven shards: bound by the whole
        shape = tuple(target.shape)
    return math.prod(shape) * np.dtype(target.dtype).itemsize


def _batches(members: list[int], size: Callable[[int], int], limit: int) -> list[list[int]]:
    """Consecutive groups whose sizes add up to at most ``limit`` (a bigger leaf goes alone)."""
    out: list[list[int]] = []
    total = 0
    for i in members:
        n = size(i)
        if not out or total + n > limit:
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return out


def _merge(
    jax: Any, layout: _Mesh, axis_index: int, batch: list[int], targets: list[Any], got: Any
) -> list[Any]:
    """One collective for a group: stack every device's shard (zeros off the primary replica)
    along a new replica axis, then sum it away on the bits."""
    import jax.numpy as jnp

    P, NamedSharding = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    position = {d: idx[axis_index] for idx, d in np.ndenumerate(layout.mesh.devices)}
    stacked, shardings = [], []
    for k, i in enumerate(batch):
        shape, dtype = tuple(targets[i].shape), np.dtype(targets[i].dtype)
        spec = tuple(targets[i].sharding.spec)
        full = NamedSharding(layout.mesh, P(*spec))
        restored = got[k] if got is not None else None
        shards = restored.addressable_shards if restored is not None else []
        mine = {s.device: s.data for s in shards}
        bufs = []
        for device, index in full.addressable_devices_indices_map(shape).items():
            if position[device] == 0:
                bufs.append(jnp.expand_dims(mine[device], 0))
            else:
                part = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
                bufs.append(jnp.zeros((1, *part), dtype, device=device))
        if restored is not None:
            restored.delete()  # its shards are copied into bufs
        stacked.append(
            jax.make_array_from_single_device_arrays(
                (layout.replicas, *shape), NamedSharding(layout.mesh, P(layout.axis, *spec)), bufs
            )
        )
        shardings.append(full)
    merged = jax.jit(_sum_replicas, out_shardings=tuple(shardings))(tuple(stacked))
    for x in stacked:
        x.delete()
    return list(merged)


def _sum_replicas(stacked: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_bit_sum(x) for x in stacked)


def _bit_sum(x: Any) -> Any:
    """``x.sum(axis=0)`` bit for bit, where every slice but one is all zero bits."""
    import jax.numpy as jnp
    from jax import lax

    if x.dtype == jnp.bool_:
        return jnp.any(x, axis=0)
    if jnp.issubdtype(x.dtype, jnp.integer):
        return jnp.sum(x, axis=0, dtype=x.dtype)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return lax.complex(_bit_sum(jnp.real(x)), _bit_sum(jnp.imag(x)))
    bits = jnp.finfo(x.dtype).bits
    unsigned = {4: jnp.uint4, 8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[bits]
    summed = jnp.sum(lax.bitcast_convert_type(x, unsigned), axis=0, dtype=unsigned)
    return lax.bitcast_convert_type(summed, x.dtype)


def _broadcast_host(
    source: LeafReader,
    keys: list[str],
    targets: list[Any],
    host: list[int],
    out: list[Any],
    sender: int,
    limit: int,
) -> None:
    """Host leaves: ``sender`` reads them as saved, every process gets the bytes (unsigned, so
    the sum inside ``broadcast_one_to_all`` is exact) and makes its target of them."""
    from jax.experimental import multihost_utils

    read = source.read if process_index() == sender else _nothing
    saved = {i: source.saved(keys[i]) for i in host}
    for batch in _batches(host, lambda i: math.prod(saved[i][0]) * saved[i][1].itemsize, limit):
        if process_count() == 1:
            raws = source.read(_at(keys, batch), [None] * len(batch))
        else:
            got = _agreed("host", read, _at(keys, batch), [None] * len(batch))
            raws = got or [np.zeros(*saved[i]) for i in batch]
            flat = [np.ascontiguousarray(r).reshape(-1).view(np.uint8) for r in raws]
            sent = multihost_utils.broadcast_one_to_all(flat, is_source=got is not None)
            raws = [
                np.asarray(b, np.uint8).view(saved[i][1]).reshape(saved[i][0])
                for b, i in zip(sent, batch)
            ]
        _fill(out, batch, [source.finish_host(keys[i], r, targets[i]) for r, i in zip(raws, batch)])


def _nothing(keys: list[str], targets: list[Any]) -> None:
    """What a process outside the primary replica reads: nothing."""


def _agreed(name: str, run: Callable[..., T], *args: Any) -> T:
    """``run(*args)``, once every process has said whether its own run worked: a failure
    anywhere is raised everywhere (this process's own, else the first other's, with its stepsafe
    type), so that no process waits in a collective for one that gave up."""
    if process_count() == 1:
        return run(*args)
    error: Exception | None = None
    try:
        result = run(*args)
    except Exception as e:  # told to the others, then raised here unchanged
        error = e
    failures = gather_failures(f"single_replica/{name}", error)
    if error is not None:
        raise error
    first = next((f for f in failures if f is not None), None)
    if first is not None:
        raise as_error(first, len(failures))
    return result


def _at(items: list[Any], indices: list[int]) -> list[Any]:
    return [items[i] for i in indices]


def _fill(out: list[Any], indices: list[int], values: list[Any]) -> None:
    for i, v in zip(indices, values, strict=True):
        out[i] = v
