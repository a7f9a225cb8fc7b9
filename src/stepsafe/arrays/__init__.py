"""Adapters between array libraries and host bytes: numpy always, JAX when it is loaded."""

from stepsafe.arrays.leaves import is_array, is_jax_array, is_leaf, is_value, to_host
from stepsafe.arrays.staging import StagingBuffers

__all__ = ["StagingBuffers", "is_array", "is_jax_array", "is_leaf", "is_value", "to_host"]
