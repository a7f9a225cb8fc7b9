"""Restore a run's step, and resume from the newest one that restores.

A resume must not stop at a damaged latest step (a flipped bit, a truncated file) when an older
one is intact: the damaged step is logged at ERROR and skipped, and left in place, untouched,
for the user to inspect (``stepsafe verify``); nothing is deleted.
"""

from __future__ import annotations

import logging
from typing import Any

from stepsafe.arrays.single_replica import SingleReplica
from stepsafe.checkpoint.restore import open_checkpoint, restore_from
from stepsafe.distributed import process_index
from stepsafe.distributed.outcomes import as_error, gather_failures
from stepsafe.errors import CheckpointNotFoundError, CorruptCheckpointError
from stepsafe.manager.iterator_state import CheckpointableIterator, restore_iterator
from stepsafe.storage import Storage

log = logging.getLogger("stepsafe")


def restore_step(
    storage: Storage,
    path: str,
    step: int,
    target: Any,
    data_iterator: CheckpointableIterator | None,
    single_replica: SingleReplica | None = None,
    select: Any = None,
) -> Any:
    """The state at ``path`` (step ``step``), and the data iterator's position set (``select``:
    part of the tree only, as ``stepsafe.restore`` takes it); under
    several processes every process restores it, or every process raises (the error of the
    first that failed, with its type: one process resuming while another gives up would
    split the job).

    Raises:
        CorruptCheckpointError: the step is damaged (on any process).
        StepsafeError: as ``restore`` raises it, on any process.
    """
    state, error = _try_restore(storage, path, target, data_iterator, single_replica, select)
    _raise_first(gather_failures(f"restore-{step}", error), error)
    log.info("Restored step %d from %s", step, path)
    return state


def _try_restore(
    storage: Storage,
    path: str,
    target: Any,
    data_iterator: CheckpointableIterator | None,
    single_replica: SingleReplica | None,
    select: Any = None,
) -> tuple[Any, Exception | None]:
    try:
        with open_checkpoint(path, storage) as reader:
            state = restore_from(reader, target, select, single_replica=single_replica)
        if data_iterator is not None:
            restore_iterator(storage, path, data_iterator, process_index())
    except Exception as e:
        return None, e
    return state, None


def _raise_first(failures: list[dict[str, Any] | None], mine: Exception | None) -> None:
    """Raise the first failure of any process: this process's own error if it is that one."""
    first = next((f for f in failures if f is not None), None)
    if first is None:
        return
    if mine is not None and first["process"] == process_index():
        raise mine
    raise as_error(first, len(failures))


def restore_newest(
    storage: Storage,
    directory: str,
    steps: list[int],
    target: Any,
    data_iterator: CheckpointableIterator | None,
    damaged: set[int],
    single_replica: SingleReplica | None = None,
) -> tuple[int, Any]:
    """(step, state) of the newest of ``steps`` (committed, oldest first, the same list on
    every process) that restores on every process; the damaged ones passed by are added to
    ``damaged``.

    Raises:
        CheckpointNotFoundError: ``steps`` is empty.
        CorruptCheckpointError: every step is damaged.
    """
    if not steps:
        raise CheckpointNotFoundError(f"no committed checkpoint under {directory}")
    errors: list[tuple[int, CorruptCheckpointError]] = []
    for step in reversed(steps):
        path = storage.join(directory, str(step))
        try:
            state = restore_step(storage, path, step, target, data_iterator, single_replica)
        except CorruptCheckpointError as e:
            errors.append((step, e))
            damaged.add(step)
            log.error(
                "Checkpoint at step %d cannot be restored, it is damaged (%s: %s); it was "
                "left in place (check it with `stepsafe verify %s`); trying the step before",
                step, type(e).__name__, e, path,
            )  # fmt: skip
            continue
        if errors:
            log.error(
                "Resumed from step %d, not from the newest step %d, which is damaged and "
                "was left in place (damaged: %s)",
                step, errors[0][0], ", ".join(str(s) for s, _ in errors),
            )  # fmt: skip
        return step, state
    raise CorruptCheckpointError(
        f"every committed checkpoint under {directory} is damaged (steps "
        f"{', '.join(str(s) for s, _ in errors)}); nothing was deleted: check them with "
        "`stepsafe verify`, or move them aside to start from scratch"
    ) from errors[0][1]
