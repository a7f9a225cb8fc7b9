"""Host-local leaves under several processes: whose copy is saved.

A numpy array, or a JAX array on one device of one process with no mesh, exists separately in
every process of a ``jax.distributed`` job, possibly with different contents. A checkpoint
holds one copy: process 0's (as Orbax and MaxText do). The other processes describe such a
leaf (key, dtype, shape) and write none of its bytes, so that no byte is written twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stepsafe.arrays.leaves import is_jax_array, refuse_masked
from stepsafe.format.dtypes import dtype_to_str
from stepsafe.format.plan import HostArray


def is_host_local(x: Any) -> bool:
    """True for a numpy array or scalar, and for a JAX array on this process's devices only
    that has no mesh (one device: what ``jnp`` makes outside ``jit``, separately in each
    process). An array with a mesh (a ``NamedSharding``) is global even when only this
    process's devices hold it (a pipeline stage on a sub-mesh): its holders write it."""
    if not is_jax_array(x):
        return True
    import jax

    return bool(x.is_fully_addressable) and not isinstance(x.sharding, jax.sharding.NamedSharding)


def described(path: str, x: Any) -> HostArray:
    """``x`` as a ``HostArray`` without shards, checked as ``to_host`` checks it (the same
    refusal on every process: one process refusing alone would leave the others waiting).

    Raises:
        UnsupportedLeafError: a masked array, or a dtype the format cannot store.
    """
    refuse_masked(path, x)
    dtype = np.dtype(x.dtype)
    dtype_to_str(dtype, path)
    return HostArray(path, dtype, tuple(np.shape(x)), [])
