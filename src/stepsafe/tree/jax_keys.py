"""Typed JAX PRNG keys (``jax.random.key``) as tree nodes: their data under their impl's name.

A typed key's dtype (``key<fry>``) is not a numpy dtype, so its bytes cannot be saved as they
are. Its data (``jax.random.key_data``: uint32, the key's shape plus the impl's own) can, and
the impl decides what that data means, so the impl is recorded as the one key of a node:

    ["node", "jax.random.key", ["threefry2x32"], [["leaf"]]]   key path ``rng/threefry2x32``

Restored onto a typed key (or its ``jax.ShapeDtypeStruct``) it comes back as a typed key of
the target's impl; a target of another impl does not match the saved key path, so a key is
never reinterpreted by a different generator. Without a target it comes back, like any custom
node, as a dict: ``{"threefry2x32": key data}``, which ``jax.random.wrap_key_data(data,
impl="threefry2x32")`` turns back into the key. Raw uint32 keys (``jax.random.PRNGKey``) are
plain arrays and need none of this.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

TYPE_NAME = "jax.random.key"


def key_node(x: Any) -> tuple[str, Any, Callable[[Any], Any]] | None:
    """For a typed PRNG key (an array, or a ShapeDtypeStruct describing one): its impl's name,
    its data (a ShapeDtypeStruct of it for a description) and how to make the key from the
    data again. None for anything else."""
    jax = sys.modules.get("jax")
    if jax is None or not isinstance(x, jax.Array | jax.ShapeDtypeStruct):
        return None
    if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return None
    if isinstance(x, jax.Array):
        impl = jax.random.key_impl(x)
        return str(impl), jax.random.key_data(x), lambda d: jax.random.wrap_key_data(d, impl=impl)
    # A description: the data is read unplaced and the key then put where the target says,
    # since a sharding of the key's shape need not fit the data's extra dimensions.
    found: list[Any] = []

    def data_of(k: Any) -> Any:
        found.append(jax.random.key_impl(k))
        return jax.random.key_data(k)

    data = jax.eval_shape(data_of, jax.ShapeDtypeStruct(x.shape, x.dtype))
    sharding = getattr(x, "sharding", None)

    def rebuild(d: Any) -> Any:
        key = jax.random.wrap_key_data(d, impl=found[0])
        return key if sharding is None else jax.device_put(key, sharding)

    return str(found[0]), jax.ShapeDtypeStruct(data.shape, data.dtype), rebuild
