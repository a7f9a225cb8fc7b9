"""What every part of the GPU check shares: the state on the device, bit-exact comparison, a
donated training step, timers."""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from benchmarks import states

Tree = dict[str, Any]


def now() -> float:
    return time.perf_counter()


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def build_state(name: str, device: jax.Device) -> Tree:
    """The benchmark state with every array committed to ``device``."""
    tree = states.build(name, lambda a: jax.device_put(a, device))
    jax.block_until_ready(tree)
    return tree


def arrays_of(tree: Tree) -> Tree:
    return {k: v for k, v in tree.items() if k != "step"}


def host_copy(tree: Tree) -> Tree:
    """A numpy copy of the arrays, the reference a restore must match bit for bit. Taken from
    device-side copies: ``np.asarray`` on a live array caches its host value in the array, and
    a later save of that array would then read the cache instead of transferring."""
    copies = jax.tree.map(lambda x: x.copy(), arrays_of(tree))
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(copies))


def bit_exact(ref: Tree, got: Tree) -> tuple[bool, list[str]]:
    """Compare every array's bits (not values: NaNs and -0.0 count) and report mismatches."""
    bad: list[str] = []
    ref_leaves = jax.tree_util.tree_leaves_with_path(ref)
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    if [p for p, _ in ref_leaves] != [p for p, _ in got_leaves]:
        return False, ["tree structure differs"]
    for (path, a), (_, b) in zip(ref_leaves, got_leaves):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
            bad.append(jax.tree_util.keystr(path))
    return not bad, bad[:5]


def compiled_update(tree: Tree) -> Callable[[Tree], Tree]:
    """A jitted elementwise step that donates (and so overwrites) every input buffer. ``x + 1``
    changes every value for thousands of steps (a contraction such as ``0.5 * x + 1`` reaches
    its fixed point after a few dozen, and then the donation check proves nothing)."""

    def step(arrays: Tree) -> Tree:
        return jax.tree.map(lambda x: x + 1.0, arrays)

    return jax.jit(step, donate_argnums=0).lower(arrays_of(tree)).compile()


def run_update(update: Callable[[Tree], Tree], tree: Tree) -> tuple[Tree, float, bool]:
    """One donated step; returns the new tree, its seconds, and whether the inputs were donated."""
    old = jax.tree.leaves(arrays_of(tree))
    t0 = now()
    new = update(arrays_of(tree))
    jax.block_until_ready(new)
    dt = now() - t0
    donated = all(x.is_deleted() for x in old)
    return {**new, "step": tree["step"]}, dt, donated


def sharded_target(tree: Tree) -> Tree:
    """ShapeDtypeStructs carrying each array's sharding: restore straight onto the device."""
    out = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), arrays_of(tree)
    )
    out["step"] = 0
    return out


def device_bytes(device: jax.Device) -> int | None:
    stats = device.memory_stats() or {}
    return stats.get("bytes_in_use")


def profiled(fn: Callable[[], Any], lines: int = 18) -> tuple[Any, float, str]:
    """``fn()`` under cProfile: its result, seconds, and the top ``lines`` by cumulative time."""
    prof = cProfile.Profile()
    t0 = now()
    prof.enable()
    out = fn()
    prof.disable()
    dt = now() - t0
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(lines)
    return out, dt, text.getvalue()


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``'s result, the seconds until it returned, and until its arrays were ready."""
    t0 = now()
    out = fn()
    returned = now() - t0
    jax.block_until_ready([x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)])
    return out, returned, now() - t0


def timed_restore(fn: Callable[[], Tree]) -> tuple[Tree, float]:
    t0 = now()
    out = fn()
    jax.block_until_ready(out)
    return out, now() - t0


def on_device(tree: Tree, like: Tree) -> bool:
    """Every restored array is a jax.Array with the sharding of the array it restores."""
    got, want = jax.tree.leaves(arrays_of(tree)), jax.tree.leaves(arrays_of(like))
    return all(
        isinstance(g, jax.Array) and g.sharding == w.sharding
        for g, w in zip(got, want, strict=True)
    )
