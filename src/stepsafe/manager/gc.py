"""Delete old checkpoints of a run safely: what ``stepsafe gc`` does, callable from Python.

Kept: the newest ``keep`` committed steps (``keep >= 1``: the newest committed step, the one a
resume loads, is never deleted) and any incomplete save that may still be running.
Deleted: older committed steps, and incomplete ones that are stale. An incomplete entry is
stale when a newer step is already committed (saves run in step order, so nothing is still
writing it) or, on local disk, when it is the temporary of a process on this host that is gone.
Each deletion removes the commit marker first (``delete_checkpoint``), so a deletion cut short
leaves an incomplete step, never a damaged one that looks complete. In the committed steps it
keeps, gc also deletes stray files: those of an earlier save of the same step that died or lost
a race on a bucket, which the commit does not name (``stray_files``). And it aborts unfinished
S3 multipart uploads that such saves left in a committed or stale step: no listing shows them,
but the bucket keeps (and bills) their parts.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from stepsafe.checkpoint.locate import CHECKPOINTS_DIR
from stepsafe.errors import CheckpointNotFoundError, StepsafeError
from stepsafe.format import delete_checkpoint, stray_files
from stepsafe.manager.inventory import RunInventory, StepEntry, scan_run
from stepsafe.storage import LocalStorage, Storage, stale_temporaries, storage_for


@dataclass(frozen=True)
class GcAction:
    entry: StepEntry
    reason: str


@dataclass
class GcPlan:
    run: RunInventory
    delete: list[GcAction] = field(default_factory=list)
    keep: list[GcAction] = field(default_factory=list)
    strays: dict[int, list[str]] = field(default_factory=dict)  # kept step -> stray file paths
    uploads: list[tuple[str, str]] = field(default_factory=list)  # (path, id) to abort
    dry_run: bool = True
    done: bool = False  # True once the deletions were carried out

    @property
    def bytes_freed(self) -> int:
        return sum(a.entry.size_bytes for a in self.delete)


def plan_gc(run: RunInventory, keep: int, *, storage: Storage | None = None) -> GcPlan:
    """What ``gc`` would delete from ``run``, and why each step is kept or not."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the newest committed step is never deleted): {keep}")
    done = run.complete
    newest = done[-1].step if done else None
    kept_steps = {e.step for e in done[-keep:]}
    dead = set()
    if storage is not None and isinstance(storage, LocalStorage):
        dead = set(stale_temporaries(run.checkpoints_dir))
    plan = GcPlan(run)
    for e in run.steps:
        if e.complete:
            if e.step in kept_steps:
                plan.keep.append(GcAction(e, f"among the newest {keep} committed"))
            else:
                plan.delete.append(GcAction(e, f"older than the newest {keep} committed"))
        elif newest is not None and e.step < newest:
            plan.delete.append(GcAction(e, f"incomplete, and step {newest} is committed"))
        elif e.path in dead:
            plan.delete.append(GcAction(e, "incomplete, its writer process is gone"))
        else:
            plan.keep.append(GcAction(e, "incomplete, may be a save in progress"))
    if storage is not None:
        for a in plan.keep:
            strays = stray_files(storage, a.entry.path) if a.entry.complete else []
            if strays:
                plan.strays[a.entry.step] = strays
        committed = {e.step for e in done}
        for upload in storage.unfinished_uploads(run.checkpoints_dir):
            step = _step_of(run.checkpoints_dir, upload[0])
            if step is not None and (step in committed or (newest is not None and step < newest)):
                plan.uploads.append(upload)
    return plan


def _step_of(checkpoints_dir: str, path: str) -> int | None:
    rel = path[len(checkpoints_dir.rstrip("/")) + 1 :] if path.startswith(checkpoints_dir) else ""
    name = rel.split("/", 1)[0]
    return int(name) if name.isdigit() else None


def gc(path: str, keep: int, *, dry_run: bool = False) -> GcPlan:
    """Delete what ``plan_gc`` selects in the run at ``path`` (a run directory or its
    ``checkpoints/``); with ``dry_run`` only return the plan."""
    storage, run = _open_run(path)
    plan = plan_gc(run, keep, storage=storage)
    plan.dry_run = dry_run
    if not dry_run:
        for action in plan.delete:
            delete_checkpoint(storage, action.entry.path)
        for strays in plan.strays.values():
            for path in strays:
                storage.delete_file(path)
        for path, upload_id in plan.uploads:
            storage.abort_upload(path, upload_id)
        plan.done = True
    return plan


def _open_run(path: str) -> tuple[Storage, RunInventory]:
    storage, p = storage_for(str(path))
    p = p.rstrip("/") or "/"
    if storage.is_dir(storage.join(p, CHECKPOINTS_DIR)):
        run_dir = p
    elif posixpath.basename(p) == CHECKPOINTS_DIR and storage.is_dir(p):
        run_dir = posixpath.dirname(p)
    elif storage.exists(p):
        raise StepsafeError(
            f"{path} is not a run directory (no {CHECKPOINTS_DIR}/ inside): gc works on a whole "
            f"run, e.g. <base_output_directory>/<run_name>"
        )
    else:
        raise CheckpointNotFoundError(f"{path} does not exist")
    return storage, scan_run(storage, run_dir, posixpath.basename(run_dir))
