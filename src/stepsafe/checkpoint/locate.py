"""Find the checkpoint a user means from the path they typed.

Accepted, as MaxText's docs write them: a step directory (``.../checkpoints/1000``), its ``items/``
child, the docs' ``.../checkpoints/items/1000`` spelling, a ``checkpoints`` directory, or a run
directory holding ``checkpoints/`` (both mean: the latest committed step). The run's layout
itself is run_layout.py's.
"""

from __future__ import annotations

import posixpath

from stepsafe.checkpoint.run_layout import CHECKPOINTS_DIR, is_step_name, step_number, step_path
from stepsafe.errors import CheckpointNotFoundError, IncompleteCheckpointError
from stepsafe.format import COMMIT_FILE, ITEMS_DIR, is_committed
from stepsafe.storage import Storage


def _committed(storage: Storage, path: str) -> bool:
    """``is_committed``, where a step that cannot be read at all (a symbolic link loop, no
    permission) is simply not a committed one."""
    try:
        return is_committed(storage, path)
    except OSError:
        return False


def committed_steps(storage: Storage, directory: str) -> list[int]:
    """Steps under ``directory`` (names that are integers) that hold a committed checkpoint."""
    steps = [s for s in map(step_number, storage.list_dir(directory)) if s is not None]
    return sorted(s for s in steps if _committed(storage, step_path(storage, directory, s)))


def uncommitted_entries(storage: Storage, directory: str) -> list[str]:
    """Step-like names under ``directory`` that are not committed checkpoints."""
    return [
        n
        for n in storage.list_dir(directory)
        if storage.temporary_target(n) is not None
        or (is_step_name(n) and not _committed(storage, storage.join(directory, n)))
    ]


def locate(storage: Storage, path: str) -> str:
    """The step directory ``path`` designates; raises when there is none or it is incomplete."""
    p = path.rstrip("/") or "/"
    base = posixpath.basename(p)
    parent = posixpath.dirname(p)
    if not storage.exists(p):
        if posixpath.basename(parent) == ITEMS_DIR and is_step_name(base):
            alt = storage.join(posixpath.dirname(parent), base)
            if storage.exists(alt):
                return locate(storage, alt)
        raise CheckpointNotFoundError(f"{path} does not exist")
    if storage.temporary_target(base) is not None:
        raise IncompleteCheckpointError(
            f"{path} is the temporary directory of a save that never committed; it is not a "
            "checkpoint (`stepsafe gc` removes it once its writer is gone)"
        )
    if storage.exists(storage.join(p, COMMIT_FILE)) or storage.is_dir(storage.join(p, ITEMS_DIR)):
        return p
    if base == ITEMS_DIR and storage.exists(storage.join(parent, COMMIT_FILE)):
        return parent
    for d in (storage.join(p, CHECKPOINTS_DIR), p):
        steps = committed_steps(storage, d)
        if steps:
            return step_path(storage, d, steps[-1])
    pending = uncommitted_entries(storage, storage.join(p, CHECKPOINTS_DIR)) + uncommitted_entries(
        storage, p
    )
    if pending:
        raise IncompleteCheckpointError(
            f"no committed checkpoint under {path}; only incomplete ones: {', '.join(pending)}"
        )
    raise CheckpointNotFoundError(
        f"{path} holds no stepsafe checkpoint: expected a step directory (with "
        f"{COMMIT_FILE}), its {ITEMS_DIR}/, or a run directory with {CHECKPOINTS_DIR}/<step>/"
    )
