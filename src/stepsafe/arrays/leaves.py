"""Which leaves are arrays, which are small inline values, and the host snapshot of an array.

The snapshot is what a save writes from: numpy arrays are used in place (``copy=False``) or
copied (``copy=True``, for async saves: the caller may change them in place the moment
``save`` returns); JAX arrays are brought to host shard by shard (on the CPU as views, even
for async saves: they are immutable), each replica written once (under several processes split
among the devices holding it), with their sharding.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from stepsafe.arrays.staging import StagingBuffers
from stepsafe.errors import UnsupportedLeafError
from stepsafe.format.dtypes import dtype_to_str
from stepsafe.format.plan import HostArray
from stepsafe.storage.host_memory import copy_of

VALUE_TYPES = (type(None), bool, int, float, str)


def is_value(x: Any) -> bool:
    return type(x) in VALUE_TYPES


def is_jax_array(x: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.Array)


def is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray | np.generic) or is_jax_array(x)


def is_leaf(x: Any) -> bool:
    return is_value(x) or is_array(x)


def full_index(shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((0, n) for n in shape)


def copy_accelerator_leaves(
    leaves: list[tuple[str, Any]],
) -> tuple[list[tuple[str, Any]], set[str]]:
    """``leaves`` with every JAX array that lives on an accelerator replaced by a private copy
    on its devices, made in one batched dispatch; and the paths so copied, which need no host
    copy any more (see ``jax_arrays.copy_on_devices``)."""
    if "jax" not in sys.modules:
        return leaves, set()
    from stepsafe.arrays.jax_arrays import copy_on_devices, on_accelerator

    chosen = [i for i, (_, x) in enumerate(leaves) if on_accelerator(x)]
    if not chosen:
        return leaves, set()
    out = list(leaves)
    for i, y in zip(chosen, copy_on_devices([leaves[i][1] for i in chosen]), strict=True):
        out[i] = (leaves[i][0], y)
    return out, {leaves[i][0] for i in chosen}


def start_host_transfers(arrays: list[HostArray]) -> None:
    """Start bringing every shard that is still on a device to host, all at once."""
    pending = [d for a in arrays for _, d in a.shards if is_jax_array(d)]
    if pending:  # (only then is the JAX adapter imported: a fresh process pays for that)
        from stepsafe.arrays.jax_arrays import start_host_copies

        start_host_copies(pending)


def refuse_masked(path: str, x: Any) -> None:
    """Refuse a numpy masked array: only its data would be saved, its mask lost.

    Raises:
        UnsupportedLeafError: naming the leaf and what to save instead.
    """
    ma = sys.modules.get("numpy.ma")  # not imported: no masked array exists (importing: 10 ms)
    if ma is not None and isinstance(x, ma.MaskedArray):
        raise UnsupportedLeafError(
            f"leaf at {path or '<root>'!r} is a numpy masked array, and stepsafe saves only "
            "the data, so its mask would be lost: save x.data and np.ma.getmaskarray(x) "
            "as two arrays"
        )


def to_host(path: str, x: Any, *, copy: bool, staging: StagingBuffers | None = None) -> HostArray:
    """``copy``: the result shares no memory that the caller can change: a numpy ``x`` is
    copied (into ``staging`` if given); a JAX array, immutable, is not (``host_shards``).

    Raises:
        UnsupportedLeafError: ``x`` is a numpy masked array, whose mask would be lost.
    """
    refuse_masked(path, x)
    if is_jax_array(x):
        from stepsafe.arrays.jax_arrays import describe_sharding, host_shards, mesh_device_ids

        dtype = np.dtype(x.dtype)
        dtype_to_str(dtype, path)
        shards = host_shards(x, path, copy)
        return HostArray(
            path, dtype, tuple(x.shape), shards, describe_sharding(x.sharding),
            mesh_device_ids(x.sharding),
        )  # fmt: skip
    a = np.asarray(x)
    dtype_to_str(a.dtype, path)
    if copy and staging is not None:
        a = staging.copy(path, a)
    elif copy or not a.flags.c_contiguous:
        a = copy_of(a)
    return HostArray(path, a.dtype, a.shape, [(full_index(a.shape), a)])
