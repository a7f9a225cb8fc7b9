"""Restore a run's step, and resume from the newest one that restores.

A resume must not stop at a damaged latest step (a flipped bit, a truncated file) when an older
one is intact: the damaged step is logged at ERROR and skipped, and left in place, untouched,
for the user to inspect (``stepsafe verify``); nothing is deleted.
"""

from __future__ import annotations

import logging
from typing import Any

from stepsafe.checkpoint.restore import open_checkpoint, restore_from
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
) -> Any:
    """The state at ``path`` (step ``step``), and the data iterator's position set."""
    with open_checkpoint(path, storage) as reader:
        state = restore_from(reader, target)
    if data_iterator is not None:
        restore_iterator(storage, path, data_iterator)
    log.info("Restored step %d from %s", step, path)
    return state


def restore_newest(
    storage: Storage,
    directory: str,
    steps: list[int],
    target: Any,
    data_iterator: CheckpointableIterator | None,
    damaged: set[int],
) -> tuple[int, Any]:
    """(step, state) of the newest of ``steps`` (committed, oldest first) that restores; the
    damaged ones passed by are added to ``damaged``.

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
            state = restore_step(storage, path, step, target, data_iterator)
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
