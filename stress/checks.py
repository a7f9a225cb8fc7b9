"""What a run must look like after anything went wrong: the promises the crash campaigns check.

- every committed step restores bit-exact to the state saved at that step (never committed but
  wrong);
- every step that was committed before the trouble is still committed and exact, unless
  retention may have removed it legitimately (enough newer committed steps exist);
- nothing is left behind once the run starts again: on local disk, a new ``CheckpointManager``
  removes temporaries (and half-deleted steps); on a bucket, the next save plus ``gc`` does.
"""

from __future__ import annotations

from stepsafe import StepsafeError, restore
from stepsafe.checkpoint import committed_steps
from stepsafe.checkpoint.run_layout import CHECKPOINTS_DIR
from stepsafe.manager.gc import plan_gc
from stepsafe.manager.inventory import scan_run
from stepsafe.storage import storage_for
from stress.states import difference, make_state


def ckpt_dir(run: str) -> str:
    return f"{run.rstrip('/')}/{CHECKPOINTS_DIR}"


def committed(run: str) -> list[int]:
    storage, d = storage_for(ckpt_dir(run))
    return committed_steps(storage, d) if storage.is_dir(d) else []


def wrong_steps(run: str, sizes: dict[int, int]) -> list[str]:
    """Committed steps that do not restore to exactly what was saved at them."""
    problems = []
    for step in committed(run):
        if step not in sizes:
            problems.append(f"step {step} is committed but no save of it was started")
            continue
        try:
            got = restore(f"{ckpt_dir(run)}/{step}")
        except StepsafeError as e:
            problems.append(f"committed step {step} does not restore: {type(e).__name__}: {e}")
            continue
        diff = difference(got, make_state(step, sizes[step]))
        if diff:
            problems.append(f"committed step {step} restores WRONG data: {diff}")
    return problems


def lost_steps(run: str, before: set[int], keep: int) -> list[str]:
    """Steps committed before the trouble that are gone although retention (keeping ``keep``,
    0: all) could not have removed them: fewer than ``keep`` newer committed steps exist."""
    now = committed(run)
    problems = []
    for step in sorted(before - set(now)):
        newer = [s for s in now if s > step]
        if keep <= 0 or len(newer) < keep:
            problems.append(f"step {step} was committed before and is gone ({now} remain)")
    return problems


def leftovers(run: str) -> list[str]:
    """Whatever is not part of a committed step: temporaries, half-written or half-deleted step
    directories, files of other saves inside committed steps, unfinished uploads."""
    storage, run_dir = storage_for(run)
    if not storage.is_dir(ckpt_dir(run)):
        return []
    inventory = scan_run(storage, run_dir, "run")
    found = [f"{e.name} ({e.num_files} files, incomplete)" for e in inventory.incomplete]
    plan = plan_gc(inventory, 10**9, storage=storage)
    found += [f"stray file {p}" for paths in plan.strays.values() for p in paths]
    found += [f"unfinished upload {p}" for p, _ in plan.uploads]
    return found
