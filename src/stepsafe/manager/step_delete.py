"""``CheckpointManager.delete``'s one step: only a committed step of ours, by the same path
retention deletes with (``format.delete_checkpoint``: marker first, so a deletion cut short
leaves an incomplete step, never one that looks complete). Run by process 0 only; the manager
hands every process the same outcome.
"""

from __future__ import annotations

import logging

from stepsafe.distributed.outcomes import on_process_0
from stepsafe.errors import CheckpointNotFoundError, DeletionError, StepsafeError
from stepsafe.format import delete_checkpoint
from stepsafe.manager.inventory import COMPLETE, DAMAGED, scan_step
from stepsafe.storage import Storage

log = logging.getLogger("stepsafe")


def delete_for_job(
    name: str,
    storage: Storage,
    directory: str,
    step: int,
    lost: StepsafeError | None,
    read_only: bool,
) -> None:
    """``delete_step`` on process 0 (exchange ``name``), its outcome on every process.
    ``lost``: why this manager may no longer write the run (raised instead); ``read_only``: a
    manager with checkpointing disabled, which never deletes (refused on every process)."""
    if read_only:
        raise DeletionError(
            f"cannot delete step {step} of {directory}: this manager only reads "
            "(enable_checkpointing=False); delete with the run's saving manager"
        )

    def go() -> None:
        if lost is not None:
            raise lost
        delete_step(storage, directory, step)

    on_process_0(name, go)


def delete_step(storage: Storage, directory: str, step: int) -> None:
    """Delete committed step ``step`` under ``directory`` (a run's ``checkpoints/``).

    A damaged committed step may be deleted too (the user asked for this one by name); a
    symbolic link, an unfinished save, another tool's step, or a step holding files stepsafe
    did not write is refused and left untouched.

    Raises:
        CheckpointNotFoundError: there is no step ``step``.
        DeletionError: the step is not a committed stepsafe checkpoint, or holds files
            stepsafe did not write, or the storage refused the deletion.
    """
    path = storage.join(directory, str(step))
    if not (storage.exists(path) or storage.is_link(path)):
        raise CheckpointNotFoundError(f"cannot delete step {step}: {path} does not exist")
    entry = scan_step(storage, path, str(step), step, sizes=False)
    if entry.status not in (COMPLETE, DAMAGED) or entry.temporary:
        raise DeletionError(
            f"cannot delete step {step}: {path} is not a committed stepsafe checkpoint "
            f"({entry.status}{': ' + entry.detail if entry.detail else ''}); it is left "
            "untouched (remove it yourself if it is not needed)"
        )
    if entry.foreign:
        names = ", ".join(entry.foreign[:3]) + (", ..." if len(entry.foreign) > 3 else "")
        raise DeletionError(
            f"cannot delete step {step}: {path} holds files stepsafe did not write ({names}); "
            "it is left untouched: move them out first, or delete the step yourself"
        )
    try:
        delete_checkpoint(storage, path)
    except OSError as e:
        raise DeletionError(
            f"cannot delete step {step} at {path}: {e.strerror or e} (a read-only mount or "
            "missing permissions)"
        ) from e
    log.info("Deleted checkpoint at step %d on request (%s)", step, path)
