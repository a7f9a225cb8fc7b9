"""What ``stepsafe ls --local DIR`` lists: one process's local tier of a run, step by step.

A run with emergency or multi-tier checkpoints has a second tier outside its base output
directory: ``<local_checkpoint_directory>/<run_name>/<step>/`` on each process's own disk. Its
steps are scanned exactly as the persistent ones (``manager.inventory.scan_steps``: Complete,
Incomplete, Damaged...). A local step also says what it holds: with one process an ordinary
checkpoint of the whole state; under several, one process's own shards (its ``own_shards.json``
names which process of how many wrote it), which restore only on that process of a job of the
same size: worth seeing before copying a local disk to another host.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepsafe.checkpoint.own_shards import DESCRIPTOR, own_shards_of
from stepsafe.checkpoint.run_layout import step_of
from stepsafe.errors import CheckpointNotFoundError, StepsafeError
from stepsafe.manager.inventory import StepEntry, scan_steps
from stepsafe.storage import Storage, storage_for

WHOLE = "whole state"


@dataclass(frozen=True)
class LocalStep:
    """One entry of a local tier, and what it holds (None: unknown, it is not Complete)."""

    entry: StepEntry
    holds: str | None  # WHOLE, "process p of N's shards", or why that cannot be told
    process_index: int | None = None  # of an own-shards step: the process that wrote it
    process_count: int | None = None  # and how many the job had


@dataclass(frozen=True)
class LocalTierListing:
    path: str  # the directory given (``<local_checkpoint_directory>/<run_name>``)
    steps: list[LocalStep]
    elsewhere: list[str]  # no steps here, but these subdirectories hold some (a wrong level)

    @property
    def latest(self) -> StepEntry | None:
        done = [s.entry for s in self.steps if s.entry.complete]
        return done[-1] if done else None

    @property
    def size_bytes(self) -> int:
        return sum(s.entry.size_bytes for s in self.steps)


def scan_local(directory: str) -> LocalTierListing:
    """The steps of the local tier at ``directory``, oldest first.

    Raises:
        CheckpointNotFoundError: ``directory`` does not exist or is not a directory.
        OSError: it cannot be listed.
    """
    storage, path = storage_for(str(directory))
    if not storage.is_dir(path):
        raise CheckpointNotFoundError(
            f"local tier {directory} does not exist or is not a directory"
        )
    steps = [_local_step(storage, e) for e in scan_steps(storage, path)]
    elsewhere = [] if steps else _runs_below(storage, path)
    return LocalTierListing(path, steps, elsewhere)


def holds_text(process_index: int, process_count: int) -> str:
    return f"process {process_index} of {process_count}'s shards"


def _local_step(storage: Storage, entry: StepEntry) -> LocalStep:
    if not entry.complete:
        return LocalStep(entry, None)
    try:
        held = own_shards_of(storage, entry.path)
    except (StepsafeError, OSError) as e:
        return LocalStep(entry, f"one process's shards: {DESCRIPTOR} unreadable ({e})")
    if held is None:
        return LocalStep(entry, WHOLE)
    return LocalStep(entry, holds_text(*held), *held)


def _runs_below(storage: Storage, path: str) -> list[str]:
    """Subdirectories of ``path`` that hold steps: ``path`` was the local checkpoint directory
    itself, one level above the run's."""
    found = []
    try:
        names = storage.list_dir(path)
    except OSError:
        return []
    for name in names:
        sub = storage.join(path, name)
        try:
            if storage.is_link(sub) or not storage.is_dir(sub):
                continue
            if any(step_of(storage, n) is not None for n in storage.list_dir(sub)):
                found.append(sub)
        except OSError:
            continue
    return found
