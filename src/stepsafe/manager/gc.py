"""Delete old checkpoints of a run safely: what ``stepsafe gc`` and a manager's retention do.

Kept: the newest ``keep`` intact steps (committed, marker and manifest matching their
checksums: ``keep >= 1``, so the step a resume loads is never deleted), any incomplete save
that may still be running, and everything that is not plainly ours: damaged steps (for you to
inspect; they do not count in the keep), symbolic links, Orbax's and unknown directories, and
steps holding files stepsafe did not write (a README, a link). Deleted: older intact steps, and
incomplete ones that are stale. A temporary (local disk) whose writer process on this host is
alive is never stale (a run resumed past a damaged newest step saves older steps again), and
one whose process is gone always is: the storage says which (``Storage.writer_alive`` and
``stale_entries``; buckets have no temporaries). Any other incomplete entry is stale when a
newer step is intact (a save that died, or a deletion cut short). Whether a step is ours is
decided by ``format.deletion.foreign_files``: a user's ``eval.20241130.json`` has the shape of
an extra file, so only the files a commit names, or ``items/`` files, make a step ours.

Each deletion removes the commit marker first (``delete_checkpoint``), so a deletion cut short
leaves an incomplete step, never a damaged one that looks complete; what a concurrent deleter
removed first is not an error. In the intact steps it keeps, gc also deletes stray files:
``items/`` files stamped with the save id of an earlier save of the same step that died or lost
a race on a bucket, and extra files stamped with that same id (``stray_files``). And it aborts
unfinished S3 multipart uploads that such saves left: no listing shows them, but the bucket
keeps (and bills) their parts.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

from stepsafe.checkpoint.locate import committed_steps
from stepsafe.checkpoint.run_layout import (
    CHECKPOINTS_DIR,
    is_run_dir,
    step_number,
    step_under,
)
from stepsafe.errors import CheckpointNotFoundError, ConfigError, DeletionError, StepsafeError
from stepsafe.format import read_commit_record
from stepsafe.format.deletion import (
    StepFiles,
    delete_checkpoint,
    delete_file,
    delete_tree,
    extra_save_id,
    items_save_id,
    stray_files,
)
from stepsafe.manager.inventory import (
    COMPLETE,
    DAMAGED,
    INCOMPLETE,
    RunInventory,
    StepEntry,
    scan_run,
    scan_step,
    scan_steps,
)
from stepsafe.storage import Storage, storage_for

log = logging.getLogger("stepsafe")


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
    stray_reasons: dict[str, str] = field(default_factory=dict)  # stray path -> why it goes
    uploads: list[tuple[str, str]] = field(default_factory=list)  # (path, id) to abort
    attention: list[GcAction] = field(default_factory=list)  # kept, for a person to look at
    dry_run: bool = True
    done: bool = False  # True once the deletions were carried out

    @property
    def bytes_freed(self) -> int:
        return sum(a.entry.size_bytes for a in self.delete)


def plan_gc(
    run: RunInventory,
    keep: int,
    *,
    storage: Storage | None = None,
    kept: dict[int, str] | None = None,
) -> GcPlan:
    """What ``gc`` would delete from ``run``, and why each entry is kept or not.

    Args:
        run: the run as ``scan_run`` found it.
        keep: how many of the newest intact steps to keep (>= 1).
        storage: where the run lives; with it, stray files and unfinished uploads are planned
            too, and temporaries whose writer is alive or gone recognised.
        kept: the intact steps to keep, each with its reason (``retention_policy``'s choice);
            None: the newest ``keep``.

    Raises:
        ConfigError: ``keep < 1``.
    """
    if keep < 1:
        raise ConfigError(
            f"keep must be >= 1, got {keep} (gc's --keep; a manager's "
            "max_num_checkpoints_to_keep, where 0 keeps all): the newest committed step is "
            "never deleted"
        )
    done = run.complete
    newest = done[-1].step if done else None
    why_delete = "not among the steps the retention policy keeps"
    if kept is None:
        kept = {e.step: f"among the newest {keep} intact" for e in done[-keep:]}
        why_delete = f"older than the newest {keep} intact"
    kept_steps = set(kept)
    dead = set(storage.stale_entries(run.checkpoints_dir)) if storage is not None else set()
    plan = GcPlan(run)
    for e in run.steps:
        why_keep = _reason_to_keep(e, keep, kept)
        if why_keep:
            plan.keep.append(GcAction(e, why_keep))
            if e.status == DAMAGED or (e.ours and e.foreign and e.step not in kept_steps):
                plan.attention.append(plan.keep[-1])
        elif e.status == COMPLETE:
            plan.delete.append(GcAction(e, why_delete))
        elif storage is not None and e.temporary and storage.writer_alive(e.path):
            # a live save: a run resumed past a damaged newest step saves older steps again
            plan.keep.append(GcAction(e, "incomplete, its writer process is alive on this host"))
        elif newest is not None and e.step < newest:
            plan.delete.append(GcAction(e, f"incomplete, and step {newest} is committed"))
        elif e.path in dead:
            plan.delete.append(GcAction(e, "incomplete, its writer process is gone"))
        else:
            plan.keep.append(GcAction(e, "incomplete, may be a save in progress"))
    if storage is not None:
        _plan_strays(plan, storage)
        committed = {e.step for e in done}
        others = {e.step for e in run.steps if not e.ours}  # another tool may be writing there
        for upload in storage.unfinished_uploads(run.checkpoints_dir):
            step = step_under(run.checkpoints_dir, upload[0])
            if step is None or step in others:
                continue
            if step in committed or (newest is not None and step < newest):
                plan.uploads.append(upload)
    return plan


def _reason_to_keep(e: StepEntry, keep: int, kept_steps: dict[int, str]) -> str | None:
    """Why ``e`` must be kept whatever its age, or None when its age decides."""
    if not e.ours:
        return e.detail or e.status.lower()
    if e.status == DAMAGED:
        return f"damaged, kept for you to inspect, not counted among the {keep} kept: {e.detail}"
    if e.status == COMPLETE and e.step in kept_steps:
        return kept_steps[e.step]
    if e.foreign and not e.temporary:
        names = ", ".join(e.foreign[:3]) + (", ..." if len(e.foreign) > 3 else "")
        return f"holds files stepsafe did not write ({names}): delete it yourself if unneeded"
    return None


def _plan_strays(plan: GcPlan, storage: Storage) -> None:
    for a in plan.keep:
        e = a.entry
        if e.status != COMPLETE:
            continue
        try:
            strays = stray_files(storage, e.path, StepFiles(files=list(e.files)))
            mine = _save_id(storage, e.path)
        except (StepsafeError, OSError):  # changed since it was scanned: leave it be
            continue
        rel = len(e.path.rstrip("/")) + 1
        for path in strays:
            dead = items_save_id(path[rel:]) or extra_save_id(path[rel:])
            plan.stray_reasons[path] = (
                f"written by save {dead} of step {e.step}, which never "
                f"committed; the committed save is {mine}"
            )
        if strays:
            plan.strays[e.step] = strays


def _save_id(storage: Storage, path: str) -> str:
    return read_commit_record(storage, path).save_id


def gc(path: str, keep: int, *, dry_run: bool = False) -> GcPlan:
    """Delete what ``plan_gc`` selects in the run at ``path`` (a run directory or its
    ``checkpoints/``); with ``dry_run`` only return the plan.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        StepsafeError: ``path`` is not a run directory.
        DeletionError: the storage refused to list or delete (read-only, permissions), naming
            the path; what was deleted before stays deleted, the rest is untouched.
    """
    storage, run = _open_run(path)
    plan = plan_gc(run, keep, storage=storage)
    plan.dry_run = dry_run
    if not dry_run:
        for action in plan.delete:
            _refusing(delete_checkpoint, storage, action.entry.path)
        for strays in plan.strays.values():
            for stray in strays:
                _refusing(delete_file, storage, stray)
        for upload_path, upload_id in plan.uploads:
            _refusing(storage.abort_upload, upload_path, upload_id)
        plan.done = True
    return plan


def _refusing(fn: Callable[..., object], *args: str) -> None:
    """Run one deletion; the storage refusing it becomes a one-line DeletionError."""
    try:
        fn(*args)
    except OSError as e:
        where = e.filename if e.filename is not None else args[-1]
        raise DeletionError(
            f"cannot delete {where}: {e.strerror or e}; nothing after it was deleted (a "
            "read-only mount or missing permissions: gc needs write access to the run)"
        ) from e


def remove_half_deleted(storage: Storage, directory: str) -> list[str]:
    """Delete the incomplete steps under ``directory`` (a ``checkpoints/``) older than its newest
    committed step that hold only files stepsafe writes: what a process killed while retention
    deleted a step leaves (marker gone, the rest still there), or a save that died on a bucket
    (saves run in step order: nothing still writes them). Anything else is kept. Cheap enough
    for every start: committed steps are only recognised by their marker, never opened.
    Returns the removed paths; one that cannot be deleted (a read-only mount) is logged.
    """
    committed = committed_steps(storage, directory)
    removed = []
    for name in storage.list_dir(directory):
        step = step_number(name)
        if step is None or not committed or step >= committed[-1] or step in committed:
            continue
        e = scan_step(storage, storage.join(directory, name), name, step, sizes=False)
        if e.status != INCOMPLETE or e.foreign:
            continue
        try:
            delete_tree(storage, e.path)
        except OSError as err:  # a read-only mount can still be restored from
            log.warning("Could not remove the half-deleted step %s: %s", e.path, err)
            continue
        removed.append(e.path)
    return removed


def plan_retention(
    storage: Storage,
    directory: str,
    keep: int,
    damaged: Collection[int] = (),
    policy: Callable[[list[StepEntry]], dict[int, str]] | None = None,
) -> GcPlan:
    """What a manager's retention of ``keep`` does under ``directory`` (a ``checkpoints/``):
    ``plan_gc``'s rules (damaged, foreign and linked steps are kept and not counted), and of
    its deletions only the committed steps' (incomplete ones are for the next start and gc).
    ``damaged``: steps a restore found damaged (a flipped bit that only reading the arrays
    finds): kept and not counted either. ``policy``: the intact steps (oldest first, with
    their metrics) -> the ones to keep, with reasons (``retention_policy.choose_kept``);
    None: the newest ``keep``."""
    run = RunInventory(posixpath.basename(directory), directory, directory)
    for e in scan_steps(storage, directory, sizes=False):
        if e.step in damaged and e.status == COMPLETE and not e.temporary:
            e = replace(e, status=DAMAGED, detail="a restore found its arrays damaged")
        run.steps.append(e)
    plan = plan_gc(run, keep, kept=None if policy is None else policy(run.complete))
    plan.delete = [a for a in plan.delete if a.entry.status == COMPLETE]
    return plan


def _open_run(path: str) -> tuple[Storage, RunInventory]:
    storage, p = storage_for(str(path))
    p = p.rstrip("/") or "/"
    try:
        if is_run_dir(storage, p):
            run_dir = p
        elif posixpath.basename(p) == CHECKPOINTS_DIR and storage.is_dir(p):
            run_dir = posixpath.dirname(p)
        elif storage.exists(p):
            raise StepsafeError(
                f"{path} is not a run directory (no {CHECKPOINTS_DIR}/ inside): gc works on a "
                f"whole run, e.g. <base_output_directory>/<run_name>"
            )
        else:
            raise CheckpointNotFoundError(f"{path} does not exist")
        return storage, scan_run(storage, run_dir, posixpath.basename(run_dir))
    except OSError as e:
        if isinstance(e, StepsafeError):
            raise
        where = e.filename if e.filename is not None else path
        raise DeletionError(f"cannot list {where}: {e.strerror or e}") from e
