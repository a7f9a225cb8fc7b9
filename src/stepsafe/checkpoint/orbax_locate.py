"""Find the Orbax checkpoint a user means, from the path they typed, with no Orbax import.

MaxText's checkpoints are Orbax's: ``<run>/checkpoints/<step>/items/`` (or ``default/`` from a
single-item manager), ``_CHECKPOINT_METADATA`` beside it. The same spellings as for stepsafe's
own checkpoints are accepted: a step directory, its item directory, a ``checkpoints``
directory or a run directory (the latest step that is complete by Orbax's own rules). Callers
try stepsafe's reader first and come here only when it refuses the path, so a stepsafe
checkpoint never pays for these listings.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from stepsafe.checkpoint.run_layout import CHECKPOINTS_DIR, step_number
from stepsafe.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StepsafeError,
    UnsupportedFormatError,
)
from stepsafe.format import COMMIT_FILE
from stepsafe.format.orbax_layout import (
    ITEM_NAMES,
    is_item_dir,
    is_orbax_step,
    item_names,
    orbax_incomplete_reason,
    orbax_tmp_step,
)
from stepsafe.storage import Storage, storage_for

# What stepsafe's own reader raises for a path that may hold an Orbax checkpoint instead.
NOT_STEPSAFE = (CheckpointNotFoundError, IncompleteCheckpointError, CorruptCheckpointError,
                UnsupportedFormatError)  # fmt: skip
_MAX_METADATA_BYTES = 16 << 20
# Orbax's step names: ``<step>``, zero-padded (``step_format_fixed_length``) or after a prefix
# (``step_prefix``: ``ckpt_300``), as its ``standard_name_format`` writes them.
_ORBAX_STEP = re.compile(r"^(?:.+_)?([0-9]+)$")


def orbax_step_number(name: str) -> int | None:
    """The step an Orbax step directory's name stands for (``300``, ``000300``,
    ``ckpt_300``), or None."""
    if step_number(name) is not None:
        return step_number(name)
    match = _ORBAX_STEP.match(name) if name.isascii() else None
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class OrbaxStep:
    """An Orbax step, complete by Orbax's rules: its directory, the PyTree item read (its
    directory: ``<step>/items``, or the step itself for a bare ``PyTreeCheckpointer`` save),
    the step number (from the name) and its ``_CHECKPOINT_METADATA`` (``{}`` when none)."""

    storage: Storage
    path: str
    item: str
    step: int | None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def item_name(self) -> str:
        return "" if self.item == self.path else posixpath.basename(self.item)


def orbax_instead(path: str, error: StepsafeError) -> OrbaxStep:
    """The Orbax step ``path`` designates, now that stepsafe's reader refused it with
    ``error``; ``error`` itself when ``path`` holds no Orbax checkpoint either.

    Raises:
        IncompleteCheckpointError: the Orbax step is not complete by Orbax's rules.
        ConfigError: a step with several items and none of MaxText's names.
        StepsafeError: ``error``, when there is no Orbax checkpoint at ``path``.
    """
    found = orbax_for(path, error)
    if found is None:
        raise error
    return found


def orbax_for(path: str, error: StepsafeError) -> OrbaxStep | None:
    """``orbax_instead``, None where it raises ``error``."""
    # A run's stepsafe step that is damaged is never passed over for an Orbax step: only a run
    # with no stepsafe checkpoint at all (or none committed) is read as Orbax's.
    runs = isinstance(error, CheckpointNotFoundError | IncompleteCheckpointError)
    try:
        return find_orbax(str(path), runs=runs)
    except OSError:
        return None


def find_orbax(path: str, *, runs: bool = True) -> OrbaxStep | None:
    """The complete Orbax step ``path`` designates, or None when it designates none
    (``runs=False``: only a step or item directory designates one, not a run's listing).

    Raises:
        IncompleteCheckpointError: it designates an Orbax step that Orbax has not finished
            (or a run whose Orbax steps are all unfinished).
        ConfigError: a step with several items and none of MaxText's names.
    """
    storage, p = storage_for(str(path))
    p = p.rstrip("/") or "/"
    if not storage.exists(p) or not storage.is_dir(p):
        return None
    if is_item_dir(storage, p):
        if _in_step(storage, p):
            return _checked(storage, posixpath.dirname(p), p)
        return _checked(storage, p, p)  # StandardCheckpointer's, a bare PyTreeCheckpointer's
    if is_orbax_step(storage, p):
        return _checked(storage, p, _item(storage, p))
    if not runs:
        return None
    for d in (storage.join(p, CHECKPOINTS_DIR), p):
        if storage.is_dir(d):
            found = _latest(storage, d, path)
            if found is not None:
                return found
    return None


def _in_step(storage: Storage, item: str) -> bool:
    """Whether the item directory ``item`` is one item of a step (``<step>/items``), not a
    step itself (a ``StandardCheckpointer`` save holds its PyTree's files and its own
    ``_CHECKPOINT_METADATA``): its parent has the step's metadata, or a step's name."""
    if storage.exists(storage.join(item, COMMIT_FILE)):
        return False
    parent = posixpath.dirname(item)
    if is_item_dir(storage, parent) or not is_orbax_step(storage, parent):
        return False
    named = orbax_step_number(posixpath.basename(parent)) is not None
    return named or storage.exists(storage.join(parent, COMMIT_FILE))


def designating_path(found: OrbaxStep) -> str:
    """The step directory when reading it reads ``found``'s item (MaxText's ``items``, a
    single item, or a step that is its own item), else the item directory: what to hand
    back to ``restore``, which reads the same item then."""
    try:
        if _item(found.storage, found.path) == found.item:
            return found.path
    except (ConfigError, OSError):
        pass
    return found.item


def _item(storage: Storage, step_path: str) -> str:
    if is_item_dir(storage, step_path):  # StandardCheckpointer's step: the item itself
        return step_path
    names = item_names(storage, step_path)
    if not names:
        return step_path
    if names[0] in ITEM_NAMES or len(names) == 1:
        return storage.join(step_path, names[0])
    raise ConfigError(
        f"{step_path} holds the Orbax items {', '.join(names)}: pass the one to read "
        f"({storage.join(step_path, names[0])})"
    )


def _latest(storage: Storage, directory: str, asked: str) -> OrbaxStep | None:
    """The newest complete Orbax step under ``directory`` (a ``checkpoints/``)."""
    steps, pending = [], []
    for name in storage.list_dir(directory):
        child = storage.join(directory, name)
        if orbax_tmp_step(name) is not None:
            pending.append(name)
        elif orbax_step_number(name) is not None and is_orbax_step(storage, child):
            if orbax_incomplete_reason(storage, child) is None:
                steps.append((orbax_step_number(name), child))
            else:
                pending.append(name)
    if steps:
        step_path = max(steps)[1]
        return _checked(storage, step_path, _item(storage, step_path))
    if pending:
        raise IncompleteCheckpointError(
            f"no complete checkpoint under {asked}; only unfinished Orbax saves: "
            f"{', '.join(sorted(pending))}"
        )
    return None


def _checked(storage: Storage, step_path: str, item: str) -> OrbaxStep:
    reason = orbax_incomplete_reason(storage, step_path)
    if reason is not None:
        raise IncompleteCheckpointError(f"{step_path} is an unfinished Orbax checkpoint: {reason}")
    base = posixpath.basename(step_path)
    step = orbax_step_number(base)
    return OrbaxStep(storage, step_path, item, step, _record(storage, step_path))


def _record(storage: Storage, step_path: str) -> dict[str, Any]:
    """Orbax's ``_CHECKPOINT_METADATA`` (timestamps, custom metadata), ``{}`` when absent."""
    path = storage.join(step_path, COMMIT_FILE)
    try:
        if not storage.exists(path) or storage.is_link(path):
            return {}
        if storage.size(path) > _MAX_METADATA_BYTES:
            return {}
        doc = json.loads(storage.read_bytes(path))
    except (OSError, ValueError, RecursionError, StepsafeError):  # a FIFO: no record
        return {}
    return doc if isinstance(doc, dict) else {}
