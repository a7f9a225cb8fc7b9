"""Adapters between array libraries and host bytes: numpy always, JAX when it is loaded."""

from stepsafe.arrays.host_local import described, is_host_local
from stepsafe.arrays.leaves import (
    copy_accelerator_leaves,
    is_array,
    is_jax_array,
    is_leaf,
    is_value,
    start_host_transfers,
    to_host,
)
from stepsafe.arrays.staging import StagingBuffers

__all__ = [
    "StagingBuffers",
    "copy_accelerator_leaves",
    "described",
    "is_array",
    "is_jax_array",
    "is_host_local",
    "is_leaf",
    "is_value",
    "start_host_transfers",
    "to_host",
]
