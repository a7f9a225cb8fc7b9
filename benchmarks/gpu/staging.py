"""What an async snapshot holds on the device and what it costs, and the other ways to do its two
halves (the device-side copy, the device->host transfer) on the same leaves."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu.common import (
    Tree,
    arrays_of,
    device_bytes,
    median,
    now,
    profiled,
    timed,
)


def staging_check(tree: Tree, scratch: Path) -> dict[str, Any]:
    """What an async snapshot holds on this device (device copies or host arrays), what the
    copies cost in device memory and time, and where the background write spends its time."""
    from stepsafe.arrays import StagingBuffers
    from stepsafe.checkpoint import snapshot, write

    device = jax.tree.leaves(arrays_of(tree))[0].devices().pop()
    before = device_bytes(device)
    t0 = now()
    snap = snapshot(tree, copy=True, staging=StagingBuffers())
    snapshot_s = now() - t0
    copies = [d for a in snap.arrays for _, d in a.shards]
    jax.block_until_ready([d for d in copies if isinstance(d, jax.Array)])
    copies_ready_s = now() - t0
    after = device_bytes(device)
    kinds = sorted({f"{type(d).__module__}.{type(d).__name__}" for d in copies})
    platforms = sorted({d.devices().pop().platform for d in copies if isinstance(d, jax.Array)})
    path = scratch / "staging-check"
    _, write_s, profile = profiled(lambda: write(str(path), snap), 25)
    shutil.rmtree(path, ignore_errors=True)
    return {
        "snapshot_s": snapshot_s,
        "copies_ready_s": copies_ready_s,
        "shard_types": kinds,
        "shard_platforms": platforms,
        "device_bytes_before": before,
        "device_bytes_with_copies": after,
        "write_s": write_s,
        "write_profile": profile,
    }


def variants(tree: Tree, repeats: int) -> dict[str, Any]:
    """Other ways to do the two halves of an async save on the same leaves, to judge stepsafe's:
    the device-side copy the caller waits for (stepsafe: one ``jnp.array(copy=True)`` per
    shard on the I/O threads) and the device->host transfer the writer waits for (stepsafe: one
    blocking ``np.asarray`` per array, one after another, in ``format/plan.py:plan_files``)."""
    from stepsafe.storage import run_all

    leaves = jax.tree.leaves(arrays_of(tree))
    device = leaves[0].devices().pop()
    jit_copy = jax.jit(lambda xs: [jnp.copy(x) for x in xs])
    copiers: dict[str, Callable[[], list[jax.Array]]] = {
        "jnp_array_per_leaf_8_threads": lambda: run_all(lambda x: jnp.array(x, copy=True), leaves),
        "jnp_array_per_leaf_serial": lambda: [jnp.array(x, copy=True) for x in leaves],
        "device_put_may_alias_false": lambda: jax.device_put(leaves, may_alias=False),
        "one_jit_copy": lambda: jit_copy(leaves),
    }
    out: dict[str, Any] = {"copy": {}, "to_host": {}}
    for name, fn in copiers.items():
        try:
            rows = [timed(fn) for _ in range(repeats + 1)]
            got = rows[-1][0]
            distinct = all(
                g.unsafe_buffer_pointer() != x.unsafe_buffer_pointer() for g, x in zip(got, leaves)
            )
            out["copy"][name] = {
                "first_returned_s": rows[0][1],
                "later_returned_median_s": median([r[1] for r in rows[1:]]),
                "later_ready_median_s": median([r[2] for r in rows[1:]]),
                "distinct_buffers": distinct,
            }
            del got, rows
        except Exception as e:
            out["copy"][name] = {"error": repr(e)}

    def batched(cs: list[jax.Array]) -> list[np.ndarray]:
        for c in cs:
            c.copy_to_host_async()
        return [np.asarray(c) for c in cs]

    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    movers: dict[str, Callable[[list[jax.Array]], Any]] = {
        "asarray_serial": lambda cs: [np.asarray(c) for c in cs],
        "copy_to_host_async_then_asarray": batched,
        "device_get": jax.device_get,
        "device_put_pinned_host_then_asarray": lambda cs: [
            np.asarray(h) for h in jax.device_put(cs, pinned)
        ],
    }
    for name, fn in movers.items():
        try:
            times = []
            for _ in range(repeats + 1):
                cs = jit_copy(leaves)  # fresh copies: no host value cached in them yet
                jax.block_until_ready(cs)
                t0 = now()
                host = fn(cs)
                times.append(now() - t0)
                del cs, host
            out["to_host"][name] = {"first_s": times[0], "later_median_s": median(times[1:])}
        except Exception as e:
            out["to_host"][name] = {"error": repr(e)}
    return out
