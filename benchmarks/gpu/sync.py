"""Synchronous durable saves and restores onto the device (warm and cold page cache), stepsafe
and Orbax."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.fsutil import evict, fsync_tree
from benchmarks.gpu.common import (
    Tree,
    arrays_of,
    bit_exact,
    host_copy,
    median,
    now,
    on_device,
    sharded_target,
    timed_restore,
)


def sync_roundtrip(tree: Tree, scratch: Path, repeats: int, cold: str) -> dict[str, Any]:
    """Synchronous durable saves and restores onto the device (warm and cold page cache)."""
    import orbax.checkpoint as ocp

    import stepsafe

    ref = host_copy(tree)
    target = sharded_target(tree)
    orbax = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    libs: dict[str, tuple[Callable[[Path], None], Callable[[Path], Tree]]] = {
        "stepsafe": (
            lambda p: stepsafe.save(str(p), tree),
            lambda p: stepsafe.restore(str(p), target),
        ),
        "orbax": (
            lambda p: (orbax.save(p, args=ocp.args.StandardSave(tree)), fsync_tree(p)),
            lambda p: orbax.restore(p, args=ocp.args.StandardRestore(target)),
        ),
    }
    out: dict[str, Any] = {}
    for name, (save, restore) in libs.items():
        rows = []
        for i in range(repeats):
            path = (scratch / f"sync-{name}-{i}").absolute()
            t0 = now()
            save(path)
            save_s = now() - t0
            _, warm_s = timed_restore(lambda p=path, r=restore: r(p))
            evict(path, cold)
            got, cold_s = timed_restore(lambda p=path, r=restore: r(p))
            ok, bad = bit_exact(ref, arrays_of(got))
            rows.append(
                {
                    "save_s": save_s,
                    "restore_warm_s": warm_s,
                    "restore_cold_s": cold_s,
                    "bit_exact": ok,
                    "mismatches": bad,
                    "on_device_with_sharding": on_device(got, tree),
                }
            )
            del got
            shutil.rmtree(path, ignore_errors=True)
        out[name] = {
            "save_median_s": median([r["save_s"] for r in rows]),
            "restore_warm_median_s": median([r["restore_warm_s"] for r in rows]),
            "restore_cold_median_s": median([r["restore_cold_s"] for r in rows]),
            "all_bit_exact": all(r["bit_exact"] for r in rows),
            "all_on_device": all(r["on_device_with_sharding"] for r in rows),
            "rows": rows,
        }
    orbax.close()
    return out
