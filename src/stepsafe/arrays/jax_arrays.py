"""jax.Array <-> host shards. Imported only when a JAX array or sharding is in play."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from stepsafe.arrays.staging import StagingBuffers

Box = tuple[tuple[int, int], ...]


def box_of(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    return tuple((s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape))


def on_accelerator(x: Any) -> bool:
    return isinstance(x, jax.Array) and any(d.platform != "cpu" for d in x.devices())


def copy_on_devices(xs: list[jax.Array]) -> list[jax.Array]:
    """Private copies of ``xs``, each on its own devices, in one batched dispatch.

    Async saves on accelerators copy the state where it lies instead of bringing it to host
    while the caller waits: JAX orders the copy before any later donation of the originals, and
    the writer thread brings the copies to host. One ``device_put`` for all leaves, because
    per-leaf copies cost a dispatch each (measured on an H100 for 369 leaves: 9 ms batched,
    30-38 ms one by one).
    """
    return jax.device_put(xs, may_alias=False) if xs else []


def start_host_copies(shards: list[Any]) -> None:
    """Start every device-to-host transfer at once (they then run concurrently), so the writer
    does not wait for them one after another (measured: 0.24 s instead of 0.52 s for 1.15 GB)."""
    for data in shards:
        if isinstance(data, jax.Array):
            data.copy_to_host_async()


def host_shards(
    x: jax.Array, path: str, copy: bool, staging: StagingBuffers | None = None
) -> list[tuple[Box, np.ndarray | jax.Array]]:
    """This process's shards of ``x``, one per distinct index (replica 0 only).

    Shards on an accelerator are returned as device arrays, which the writer brings to host
    (``copy`` is refused for them: ``copy_on_devices`` makes the private copy, batched). With
    ``copy`` (async saves) the result must not share memory with ``x``, as JAX may donate and
    reuse its buffers as soon as the save returns; on the CPU, where device memory is host
    memory, a plain memcpy is faster than XLA's copy (measured: XLA blocked 0.35-1.4 s for
    1.2 GB, memcpy on two threads 0.25 s).
    """
    out: list[tuple[Box, np.ndarray | jax.Array]] = []
    for s in x.addressable_shards:
        if s.replica_id != 0:
            continue
        box = box_of(s.index, x.shape)
        if s.data.device.platform != "cpu":
            if copy:
                raise ValueError(f"{path}: copy accelerator arrays with copy_on_devices first")
            data: np.ndarray | jax.Array = s.data
        elif not copy:
            data = np.asarray(s.data)
        elif staging is not None:
            data = staging.copy((path, box), np.asarray(s.data))
        else:
            data = np.array(np.asarray(s.data), copy=True)
        out.append((box, data))
    return out


def local_boxes(shape: tuple[int, ...], sharding: Any) -> list[Box]:
    """The distinct boxes of a ``shape`` array that this process's devices hold under
    ``sharding`` (the whole array for None: JAX's default placement)."""
    if sharding is None:
        return [tuple((0, n) for n in shape)]
    wanted = sharding.addressable_devices_indices_map(shape)
    return list(dict.fromkeys(box_of(index, shape) for index in wanted.values()))


def assemble(
    shape: tuple[int, ...], dtype: np.dtype, sharding: Any, regions: dict[Box, np.ndarray]
) -> jax.Array:
    """A jax.Array with ``sharding`` from host arrays of its ``local_boxes``."""
    regions = {b: r.astype(dtype, copy=False) for b, r in regions.items()}
    if sharding is None:
        return jax.device_put(regions[tuple((0, n) for n in shape)])
    return jax.make_array_from_callback(shape, sharding, lambda idx: regions[box_of(idx, shape)])
