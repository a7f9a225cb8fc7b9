"""Async saves on the device, each followed at once by a donated step that overwrites the state:
stepsafe's ``CheckpointManager`` against Orbax's async ``StandardCheckpointer``. The checkpoint
must still hold the values at ``save`` time, bit for bit."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from benchmarks.fsutil import fsync_tree
from benchmarks.gpu.common import (
    Tree,
    arrays_of,
    bit_exact,
    compiled_update,
    host_copy,
    median,
    now,
    profiled,
    run_update,
    sharded_target,
)


def stepsafe_async(tree: Tree, scratch: Path, repeats: int) -> tuple[dict[str, Any], Tree]:
    """Saves through the run manager, each followed at once by a donated step that overwrites
    the state; the checkpoint must still hold the values at ``save`` time, bit for bit."""
    from stepsafe.manager.manager import CheckpointManager, ManagerOptions

    update = compiled_update(tree)
    tree, baseline_step_s, _ = run_update(update, tree)
    root = scratch / "stepsafe-async"
    mgr = CheckpointManager(
        str(root), ManagerOptions(async_save=True, save_interval_steps=1, max_to_keep=1)
    )
    rows = []
    for i in range(1, repeats + 2):
        ref = host_copy(tree)
        mgr.wait_until_finished()
        t0 = now()
        mgr.all_steps()  # save() lists the committed steps first; how long that takes alone
        list_s = now() - t0
        t0 = now()
        started = mgr.save(i, tree, force=True)
        blocked = now() - t0
        tree, step_s, donated = run_update(update, tree)  # clobbers the saved buffers
        t_wait = now()
        mgr.wait_until_finished()
        total = now() - t0
        restored = mgr.restore(i)
        ok, bad = bit_exact(ref, arrays_of(restored))
        changed = not bit_exact(ref, host_copy(tree))[0]
        rows.append(
            {
                "save": i,
                "started": started,
                "blocked_s": blocked,
                "list_steps_s": list_s,
                "step_after_save_s": step_s,
                "donated": donated,
                "wait_s": total - (t_wait - t0),
                "total_s": total,
                "manager_reported": mgr.last_save_seconds,
                "restored_bit_exact": ok,
                "mismatches": bad,
                "state_changed_by_step": changed,
            }
        )
        del restored, ref
    # One more save under cProfile, to show where the blocked time goes.
    mgr.wait_until_finished()
    _, _, profile = profiled(lambda: mgr.save(repeats + 2, tree, force=True))
    mgr.wait_until_finished()
    mgr.close()
    shutil.rmtree(root, ignore_errors=True)
    later = rows[1:]
    summary = {
        "first_blocked_s": rows[0]["blocked_s"],
        "first_total_s": rows[0]["total_s"],
        "later_blocked_median_s": median([r["blocked_s"] for r in later]),
        "later_blocked_max_s": max(r["blocked_s"] for r in later),
        "later_total_median_s": median([r["total_s"] for r in later]),
        "baseline_step_s": baseline_step_s,
        "step_after_save_median_s": median([r["step_after_save_s"] for r in later]),
        "all_bit_exact": all(r["restored_bit_exact"] for r in rows),
        "all_donated": all(r["donated"] for r in rows),
    }
    return {"summary": summary, "rows": rows, "profile": profile}, tree


def orbax_async(tree: Tree, scratch: Path, repeats: int) -> tuple[dict[str, Any], Tree]:
    """Orbax's async StandardCheckpointer on the same state, the same donated step after it."""
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.WARNING)
    update = compiled_update(tree)
    ckptr = ocp.StandardCheckpointer()
    rows = []
    for i in range(1, repeats + 2):
        path = (scratch / f"orbax-async-{i}").absolute()
        ref = host_copy(tree)
        t0 = now()
        ckptr.save(path, tree)
        blocked = now() - t0
        tree, step_s, donated = run_update(update, tree)
        ckptr.wait_until_finished()
        finished = now() - t0
        fsync_tree(path)
        durable = now() - t0
        restored = ckptr.restore(path, sharded_target(tree))
        ok, bad = bit_exact(ref, arrays_of(restored))
        changed = not bit_exact(ref, host_copy(tree))[0]
        rows.append(
            {
                "state_changed_by_step": changed,
                "save": i,
                "blocked_s": blocked,
                "step_after_save_s": step_s,
                "donated": donated,
                "finished_s": finished,
                "finished_fsynced_s": durable,
                "restored_bit_exact": ok,
                "mismatches": bad,
            }
        )
        del restored, ref
        shutil.rmtree(path, ignore_errors=True)
    ckptr.close()
    later = rows[1:]
    summary = {
        "first_blocked_s": rows[0]["blocked_s"],
        "first_finished_s": rows[0]["finished_s"],
        "later_blocked_median_s": median([r["blocked_s"] for r in later]),
        "later_finished_median_s": median([r["finished_s"] for r in later]),
        "later_finished_fsynced_median_s": median([r["finished_fsynced_s"] for r in later]),
        "step_after_save_median_s": median([r["step_after_save_s"] for r in later]),
        "all_bit_exact": all(r["restored_bit_exact"] for r in rows),
    }
    return {"summary": summary, "rows": rows}, tree
