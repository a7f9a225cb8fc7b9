"""Where a training run keeps its checkpoints: every run-level name, in one place.

    <base_output_directory>/<run_name>/        a run directory (MaxText's layout)
        checkpoints/                           CHECKPOINTS_DIR: everything stepsafe writes
            <step>/                            one checkpoint; inside it, ``format.layout``
            <step><storage's temporary>/       a save of <step> not committed yet (local disk)
            _LEASE                             LEASE_FILE: the writing manager's lease
        <anything else>                        the user's (logs, TensorBoard): never touched

A step's directory is named ``str(step)``: ASCII decimal digits, no leading zero (``step_number``
is the one rule every listing applies). How a save that has not committed yet is named is the
storage's business, not the run's: a local save writes into a temporary sibling of its step
(``Storage.temporary_target`` says which step it is for); a bucket writes in place and commits
with a marker, so it has no temporaries and an uncommitted step is one without its marker. Any
other name under ``checkpoints/`` (the lease, a user's ``README``) is no step, and is passed by.
"""

from __future__ import annotations

import operator
from typing import Any

from stepsafe.errors import ConfigError
from stepsafe.storage import Storage

CHECKPOINTS_DIR = "checkpoints"
LEASE_FILE = "_LEASE"


def step_number(name: str) -> int | None:
    """The step a directory name stands for, or None when it is no step's name.

    Only ASCII decimal digits written as stepsafe writes them (``str(step)``): ``"²"`` and
    ``"٣"`` are digits to ``str.isdigit`` (and ``int`` refuses the first), ``"007"`` is another
    directory than step 7's. One rule for every listing, so none can disagree on what a step is.
    """
    if name.isascii() and name.isdigit() and (name == "0" or name[0] != "0"):
        return int(name)
    return None


def is_step_name(name: str) -> bool:
    """Whether ``name`` is a step directory's name (see ``step_number``)."""
    return step_number(name) is not None


def check_step(step: Any) -> int:
    """``step`` as the int a checkpoint is named by: a Python, numpy or JAX integer scalar.

    Raises:
        ConfigError: not a non-negative integer (a save as step -5 or 2.0 would write a
            directory that no listing counts as a step: invisible, never resumed).
    """
    try:
        number = operator.index(step) if not isinstance(step, bool) else -1
    except TypeError:
        number = -1
    if number < 0:
        raise ConfigError(
            f"step must be a non-negative integer, got {step!r}: a checkpoint's directory is "
            "named by its step"
        )
    return number


def step_name(step: int) -> str:
    """The directory name of ``step``: the inverse of ``step_number``.

    Raises:
        ConfigError: see ``check_step``.
    """
    return str(check_step(step))


def step_path(storage: Storage, checkpoints_dir: str, step: int) -> str:
    """The directory of ``step`` under a run's ``checkpoints/``."""
    return storage.join(checkpoints_dir, step_name(step))


def checkpoints_dir(storage: Storage, run_dir: str) -> str:
    """The ``checkpoints/`` directory of the run at ``run_dir``."""
    return storage.join(run_dir, CHECKPOINTS_DIR)


def is_run_dir(storage: Storage, path: str) -> bool:
    """Whether ``path`` is a run directory: one holding ``checkpoints/``."""
    return storage.is_dir(checkpoints_dir(storage, path))


def step_of(storage: Storage, name: str) -> int | None:
    """The step an entry of ``checkpoints/`` belongs to: ``"300"`` -> 300, and so does a
    temporary of a save of step 300 on a storage that has them; None for anything else (the
    lease, a user's file, a temporary of no step)."""
    target = storage.temporary_target(name)
    return step_number(name if target is None else target)


def step_under(checkpoints_dir: str, path: str) -> int | None:
    """The step whose directory holds ``path`` (a path under ``checkpoints_dir``, as a
    bucket's listing of unfinished uploads gives it); None when it is in no step's."""
    base = checkpoints_dir.rstrip("/")
    if not path.startswith(base + "/"):
        return None
    return step_number(path[len(base) + 1 :].split("/", 1)[0])
