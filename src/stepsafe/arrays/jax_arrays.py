"""jax.Array <-> host shards. Imported only when a JAX array or sharding is in play."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

Box = tuple[tuple[int, int], ...]


def box_of(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    return tuple((s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape))


def host_shards(x: jax.Array, *, copy: bool) -> list[tuple[Box, np.ndarray]]:
    """This process's shards of ``x``, one per distinct index (replica 0 only)."""
    out = []
    for s in x.addressable_shards:
        if s.replica_id != 0:
            continue
        data = np.asarray(s.data)
        if copy or not data.flags.c_contiguous:
            data = np.array(data, order="C", copy=True)
        out.append((box_of(s.index, x.shape), data))
    return out


def place(
    shape: tuple[int, ...],
    dtype: np.dtype,
    sharding: Any,
    read_box: Callable[[Box], np.ndarray],
) -> jax.Array:
    """Build a jax.Array with ``sharding``, reading each distinct local region once."""
    if sharding is None:
        return jax.device_put(read_box(tuple((0, n) for n in shape)).astype(dtype, copy=False))
    wanted = sharding.addressable_devices_indices_map(shape)
    regions: dict[Box, np.ndarray] = {}
    for index in wanted.values():
        b = box_of(index, shape)
        if b not in regions:
            regions[b] = read_box(b).astype(dtype, copy=False)
    return jax.make_array_from_callback(shape, sharding, lambda idx: regions[box_of(idx, shape)])
