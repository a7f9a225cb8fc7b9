"""What a training loop feels while a save runs in the background: donated steps back to back
until the save is durable, against the same steps with no save running."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.fsutil import fsync_tree
from benchmarks.gpu.common import (
    Tree,
    compiled_update,
    median,
    now,
    run_update,
)


def stall(tree: Tree, scratch: Path, repeats: int) -> tuple[dict[str, Any], Tree]:
    """What a training loop feels while a save runs in the background: donated steps run back
    to back from the moment ``save`` returns until the save is durable (Orbax's files fsynced
    after ``wait_until_finished``, as stepsafe fsyncs its own), against the same steps with no
    save running."""

    import orbax.checkpoint as ocp

    from stepsafe.manager.manager import CheckpointManager, ManagerOptions

    update = compiled_update(tree)
    base = []
    for _ in range(30):
        tree, dt, _ = run_update(update, tree)
        base.append(dt)
    mgr = CheckpointManager(
        str(scratch / "stall-stepsafe"),
        ManagerOptions(async_save=True, save_interval_steps=1, max_to_keep=1),
    )
    ockptr = ocp.StandardCheckpointer()

    def orbax_path(i: int) -> Path:
        return (scratch / f"stall-orbax-{i}").absolute()

    libs: dict[str, tuple[Callable[[int, Tree], Any], Callable[[int], None]]] = {
        "stepsafe": (lambda i, t: mgr.save(i, t, force=True), lambda i: mgr.wait_until_finished()),
        "orbax": (
            lambda i, t: ockptr.save(orbax_path(i), t),
            lambda i: (ockptr.wait_until_finished(), fsync_tree(orbax_path(i))),
        ),
    }
    out: dict[str, Any] = {
        "baseline_step_median_s": median(base[5:]),
        "baseline_step_max_s": max(base[5:]),
    }
    for name, (save, wait) in libs.items():
        rows = []
        for i in range(1, repeats + 2):
            finished = threading.Event()
            t0 = now()
            save(i, tree)
            blocked = now() - t0
            waiter = threading.Thread(target=lambda w=wait, f=finished, i=i: (w(i), f.set()))
            waiter.start()
            steps = []
            while not finished.is_set():
                tree, dt, _ = run_update(update, tree)
                steps.append(dt)
            total = now() - t0
            waiter.join()
            rows.append(
                {
                    "blocked_s": blocked,
                    "total_s": total,
                    "steps": len(steps),
                    "step_median_s": median(steps),
                    "step_max_s": max(steps) if steps else None,
                }
            )
        later = rows[1:]
        out[name] = {
            "blocked_median_s": median([r["blocked_s"] for r in later]),
            "total_median_s": median([r["total_s"] for r in later]),
            "step_median_s": median([r["step_median_s"] for r in later]),
            "step_max_s": max(r["step_max_s"] for r in later),
            "rows": rows,
        }
    mgr.close()
    ockptr.close()
    return out, tree
