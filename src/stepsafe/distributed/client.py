"""The ONE place that touches JAX's private coordinator client.

jax 0.10.2 has no public API for the coordinator's key-value store or its barriers with a
timeout: ``jax.distributed`` exports only ``initialize``, ``is_initialized`` and ``shutdown``, and
``jax.experimental.multihost_utils`` offers collectives without timeouts that cannot run from a
background thread safely. jax's own ``array_serialization`` and Orbax's ``multihost`` module both
read ``jax._src.distributed.global_state.client``; stepsafe does the same, here only, and
``tests/test_distributed.py`` pins the method names below so that a JAX upgrade that renames
them fails loudly in CI instead of silently.
"""

from __future__ import annotations

from typing import Any

from stepsafe.distributed.processes import initialized_jax

#: The methods of ``jaxlib._jax.DistributedRuntimeClient`` that stepsafe calls.
CLIENT_METHODS = (
    "key_value_set_bytes",
    "blocking_key_value_get_bytes",
    "key_value_try_get_bytes",
    "key_value_dir_get_bytes",
    "key_value_delete",
    "wait_at_barrier",
)


def jax_client() -> Any | None:
    """The coordinator client of the initialised ``jax.distributed`` job, or None without one.

    Private API on purpose (see the module docstring); nothing else in stepsafe may reach it.
    """
    if initialized_jax() is None:
        return None
    from jax._src import distributed  # the one private touch, see above

    return distributed.global_state.client
