"""Where the demo's arrays live: a (data, model) mesh over every device of every process.

The model is sharded the way large jobs shard it, so that a checkpoint of the demo exercises
what theirs do: a weight's last axis is split over ``model`` (tensor parallelism, one row of
the mesh per host) and the axis before it over ``data`` (as fully-sharded data parallelism
does), each only where the length divides; the batch is split over ``data``. With one device
every array is whole on it, as before the mesh existed.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "model")


def make_mesh() -> Mesh:
    """One row per process (``data``), its own devices along ``model``: the model-parallel
    collectives stay inside a host, and only the data-parallel ones cross hosts."""
    rows = [
        sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
        for p in range(jax.process_count())
    ]
    return Mesh(np.array(rows, dtype=object), AXES)


def spec_for(shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The partition of an array of ``shape``: last axis over ``model``, the one before over
    ``data``, each only where the mesh axis divides it (else that axis stays whole)."""
    if not shape:
        return PartitionSpec()
    data, model = mesh.shape["data"], mesh.shape["model"]
    axes: list[str | None] = [None] * len(shape)
    if shape[-1] % model == 0 and model > 1:
        axes[-1] = "model"
    if len(shape) >= 2 and shape[-2] % data == 0 and data > 1:
        axes[-2] = "data"
    return PartitionSpec(*axes)


def state_shardings(abstract: Any, mesh: Mesh) -> Any:
    """A ``NamedSharding`` for every leaf of ``abstract`` (e.g. ``jax.eval_shape``'s result)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, spec_for(tuple(x.shape), mesh)), abstract)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """``abstract`` with each leaf's sharding attached: a restore target that says where the
    arrays go (a target without shardings would put every array on one device)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch split over ``data``; the sequence axis whole."""
    return NamedSharding(mesh, PartitionSpec("data", None))


def global_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The whole batch (every process makes the same one) as one global array: each process
    places only the rows of its own devices."""
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])
