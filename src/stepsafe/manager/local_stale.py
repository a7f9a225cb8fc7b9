"""Local steps past where a run started: they belong to a past that was not resumed.

After a fall back to the persistent tier (a process lost its disk, a local step was damaged),
or a restart from scratch, the local steps newer than the resume point are not this run's
future: left there, one process's old step N beside another's new step N would later look like
a step every process holds, and restore a mix of two runs. So before a run's first local save
they go: intact ones of ours are deleted (loudly); one a restore found damaged is moved aside
for inspection, never deleted; a link, or a step holding files stepsafe did not write, is left
in place and said, and its step is never counted as this process's again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection

from stepsafe.checkpoint.run_layout import step_name, step_number
from stepsafe.errors import StepsafeError
from stepsafe.format import delete_checkpoint
from stepsafe.manager.existing_steps import PassedSteps
from stepsafe.manager.inventory import scan_step
from stepsafe.storage import Storage

log = logging.getLogger("stepsafe")


def drop_stale(
    storage: Storage,
    directory: str,
    after: int,
    since: str,
    damaged: Collection[int],
    passed: PassedSteps,
) -> set[int]:
    """Clear the local steps under ``directory`` past ``after`` (where the run started, said
    as ``since`` in logs); ``damaged``: steps a restore found damaged. Returns the steps left
    in place (never to be counted)."""
    left: set[int] = set()
    for name in storage.list_dir(directory):
        step = step_number(name)
        if step is None or step <= after:
            continue
        path = storage.join(directory, step_name(step))
        entry = scan_step(storage, path, name, step, sizes=False)
        if not entry.ours or entry.foreign or storage.is_link(path):
            passed.report(entry)
            left.add(step)
        elif step in damaged:
            if not _move_aside(step, path):
                left.add(step)
        elif not _delete(step, path, storage, since):
            left.add(step)
    return left


def _delete(step: int, path: str, storage: Storage, since: str) -> bool:
    log.warning(
        "Deleting local checkpoint at step %d (%s): it is newer than where this run started "
        "(%s), so it belongs to a run that was not resumed, and a process's old step beside "
        "another's new one would mix two runs", step, path, since,
    )  # fmt: skip
    try:
        delete_checkpoint(storage, path)
    except (OSError, StepsafeError) as e:
        log.error("Could not delete stale local checkpoint %s: %s", path, e)
        return False
    return True


def _move_aside(step: int, path: str) -> bool:
    """A damaged local step, out of the way of a new save of its step, kept to inspect."""
    aside = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
    try:
        os.rename(path, aside)
    except OSError as e:
        log.error("Could not move the damaged local checkpoint %s aside: %s", path, e)
        return False
    log.error(
        "Moved the damaged local checkpoint at step %d aside to %s, for inspection "
        "(`stepsafe verify %s`); delete it when done", step, aside, aside,
    )  # fmt: skip
    return True
