"""The local tier: frequent checkpoints on each process's own disk, beside the persistent ones.

    <local_checkpoint_directory>/<run_name>/<step>/      one per process, on its own disk

A preemption then loses at most ``local_checkpoint_period`` steps (plus those run while the
newest local save was still being written, with async saves) instead of ``checkpoint_period``:
the local disk is fast, and nothing leaves the host. With one process a
local step is an ordinary checkpoint (so that promotion to the persistent tier copies its files
as they are); under several, each process saves every shard it holds and its own data-iterator
state (``checkpoint/own_shards.py``), so that it restores itself from its own disk alone.

Each process writes its own local directory, in the background (its own writer and staging
buffers: a slow persistent save never holds a local one up), and keeps the newest
``local_checkpoint_max_to_keep`` committed steps, deleting older ones only after a newer one
committed. A local step is never overwritten; those a run did not resume from (newer than
where it started) belong to a past that was not resumed, and are deleted, loudly, before the
first local save: otherwise one process's old step N beside another's new step N would later
look like a step every process holds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from stepsafe.arrays import StagingBuffers
from stepsafe.checkpoint import snapshot
from stepsafe.checkpoint.own_shards import (
    DESCRIPTOR,
    is_own_shards,
    own_shards_of,
    own_snapshot,
    restore_own,
    write_own,
)
from stepsafe.checkpoint.restore import open_checkpoint, restore_from
from stepsafe.checkpoint.run_layout import step_name
from stepsafe.distributed import coordinator, process_count, process_index
from stepsafe.errors import (
    ConfigError,
    CorruptCheckpointError,
    ManifestError,
    StepsafeError,
    TargetMismatchError,
)
from stepsafe.format import CommitRecord
from stepsafe.format.step_files import read_commit_record
from stepsafe.manager.async_writer import AsyncWriter
from stepsafe.manager.existing_steps import PassedSteps, apply_retention
from stepsafe.manager.gc import remove_half_deleted
from stepsafe.manager.inventory import StepEntry, scan_steps
from stepsafe.manager.iterator_state import (
    CheckpointableIterator,
    iterator_files,
    restore_iterator,
)
from stepsafe.manager.local_claim import claim_local_directory
from stepsafe.manager.local_stale import drop_stale
from stepsafe.storage import remove_stale_temporaries, storage_for

log = logging.getLogger("stepsafe")

FREE, COMMITTED, BLOCKED = "free", "committed", "blocked"  # what ``prepare`` finds


class LocalTier:
    """This process's local checkpoints of one run (see the module's docstring).

    Args:
        directory (`str`): this process's local directory for the run
            (``<local_checkpoint_directory>/<run_name>``), on a local disk; created.
        period (`int`): save steps that are a multiple of this (``local_checkpoint_period``).
        keep (`int`): committed local steps to keep, >= 1 (``local_checkpoint_max_to_keep``).
        tag (`str`): names this run's exchanges between processes.
        file_size (`int`, *optional*): where data files split; None: the local disk's default.

    Raises:
        ConfigError: ``directory`` is a bucket URL, or another process of the job uses the
            same directory on the same host.
    """

    def __init__(
        self,
        directory: str,
        period: int,
        keep: int,
        tag: str,
        *,
        persistent: str,
        file_size: int | None = None,
    ) -> None:
        if "://" in str(directory):
            raise ConfigError(
                f"local_checkpoint_directory must be a local disk, got {directory}: the "
                "persistent tier (base_output_directory) is the place for buckets"
            )
        self.storage, self.directory = storage_for(os.path.abspath(str(directory)))
        self.period, self.keep, self.tag, self.file_size = period, keep, tag, file_size
        self._writer = AsyncWriter()
        self._staging = StagingBuffers()
        self._passed = PassedSteps()  # damaged, linked, foreign entries: kept, said once
        self._damaged: set[int] = set()  # steps a restore found damaged: kept for inspection
        self._left: set[int] = set()  # stale steps that could not be deleted: never counted
        self._resumed_at: int | None = None  # where this run started: later steps are stale
        self._fresh = True  # no local save since it started: stale steps still to be dropped
        self.last_save_seconds: tuple[float, float] | None = None  # (blocked, total)
        self.pinned: Callable[[], set[int]] = set  # steps retention must keep (being promoted)
        claim_local_directory(self.directory, persistent, tag)
        for path in remove_stale_temporaries(self.directory):
            log.info("Removed the leftovers of an interrupted local save: %s", path)
        for path in remove_half_deleted(self.storage, self.directory):
            log.info("Removed the leftovers of an interrupted local deletion: %s", path)

    # -- what exists -------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """This process's committed local steps that it can restore, oldest first: intact,
        holding only files stepsafe wrote, saved by this process of a job of this size (one
        process's shards restore nowhere else)."""
        here = None if process_count() == 1 else (process_index(), process_count())
        out = []
        for e in scan_steps(self.storage, self.directory, sizes=False):
            if e.complete and not e.temporary and not e.foreign and e.step not in self._left:
                try:
                    if own_shards_of(self.storage, e.path) == here:
                        out.append(e.step)
                except (OSError, StepsafeError):
                    continue  # damaged: a restore would fail on it
        return out

    def common_steps(self) -> list[int]:
        """The local steps every process of the job has committed, oldest first."""
        lists = self.steps_by_process()
        return sorted(set(lists[0]).intersection(*lists[1:]))

    def steps_by_process(self) -> list[list[int]]:
        """Every process's ``steps()``, in process order (an exchange under several)."""
        mine = self.steps()
        c = coordinator()
        if c.count == 1:
            return [mine]
        return [
            json.loads(v)
            for v in c.all_gather(f"local-steps-{self.tag}", json.dumps(mine).encode())
        ]

    def step_path(self, step: int) -> str:
        return self.storage.join(self.directory, step_name(step))

    def should_save(self, step: int) -> bool:
        return step % self.period == 0

    # -- saving ------------------------------------------------------------------------------
    def prepare(self, step: int) -> str:
        """Whether step ``step`` can be saved here: ``FREE``, ``COMMITTED`` (already, intact:
        not saved again) or ``BLOCKED`` (its name holds something else: left in place, said).
        Waits for the previous local save first, and before the first save since the run
        started deletes the local steps past where it started.

        Raises:
            BackgroundSaveError: the previous local save failed.
        """
        self._writer.wait()
        if self._fresh:
            self._drop_stale(step)
            self._fresh = False
        path = self.step_path(step)
        if step in self.steps():
            log.info("Local checkpoint at step %d already exists; not saving it again", step)
            return COMMITTED
        if self.storage.exists(path) or self.storage.is_link(path):
            log.error(
                "Local step %d is not saved: %s holds something that is not a committed "
                "checkpoint of this process; it is left in place (move it aside to save this "
                "step)", step, path,
            )  # fmt: skip
            return BLOCKED
        return FREE

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iterator: CheckpointableIterator | None,
        record: CommitRecord,
        copy: bool,
        background: bool,
        after_commit: Callable[[int], None] | None = None,
    ) -> None:
        """Save ``state`` as local step ``step`` (``prepare`` said ``FREE``).
        ``after_commit(step)`` runs once the write is over, committed or failed (promotion, in
        multi-tier mode: under several processes every process must take part in it).

        Raises:
            UnsupportedLeafError: a leaf, or the iterator's state, that cannot be saved.
        """
        t0 = time.perf_counter()
        path = self.step_path(step)
        extra = {} if data_iterator is None else iterator_files(data_iterator, process_index())
        if process_count() == 1:
            snap = snapshot(state, copy=copy, staging=self._staging)
        else:
            snap, descriptor = own_snapshot(state, copy=copy, staging=self._staging)
            extra[DESCRIPTOR] = descriptor
        blocked = time.perf_counter() - t0

        def job() -> None:
            try:
                write_own(self.storage, path, snap, record, extra, self.file_size)
                total = time.perf_counter() - t0
                self.last_save_seconds = (blocked, total)
                log.info(
                    "Saved local checkpoint at step %d (%.1f MB, blocked %.3f s, total %.3f s)",
                    step, snap.nbytes / 1e6, blocked, total,
                )  # fmt: skip
                self.apply_retention()
            finally:
                if after_commit is not None:
                    after_commit(step)

        if background:
            self._writer.submit(f"local step {step}", job)
        else:
            job()

    def apply_retention(self) -> None:
        """Keep the newest ``keep`` intact local steps, and those waiting for promotion or
        being promoted (the persistent tier's rules otherwise: damaged, linked and foreign
        entries are kept, logged once); runs after each local commit and each promotion."""
        pinned = self.pinned()

        def kept(done: list[StepEntry]) -> dict[int, str]:
            out = {e.step: f"among the newest {self.keep} intact" for e in done[-self.keep :]}
            out.update({e.step: "waiting for its promotion" for e in done if e.step in pinned})
            return out

        policy = kept if pinned else None  # None: the newest ``keep``, said as such
        apply_retention(
            self.storage, self.directory, self.keep, self._passed, policy, "local checkpoint"
        )

    def resumed_at(self, step: int | None) -> None:
        """The run goes on after ``step`` (None: from scratch or from other weights): local
        steps past it are dropped before the next local save."""
        self._resumed_at = step
        self._fresh = True

    def _drop_stale(self, first: int) -> None:
        """The local steps after where this run started (none: from ``first`` on) go: see
        ``local_stale.drop_stale``; those that cannot are never counted as this process's."""
        after = self._resumed_at if self._resumed_at is not None else first - 1
        since = f"step {after}" if self._resumed_at is not None else "scratch"
        self._left |= drop_stale(
            self.storage, self.directory, after, since, self._damaged, self._passed
        )

    def wait(self) -> None:
        """Block until the in-flight local save is committed; raise if it failed.

        Raises:
            BackgroundSaveError: it failed (once).
        """
        self._writer.wait()

    @property
    def busy(self) -> bool:
        return self._writer.busy

    # -- restoring ---------------------------------------------------------------------------
    def restore(
        self,
        step: int,
        target: Any,
        data_iterator: CheckpointableIterator | None,
        select: Any = None,
    ) -> Any:
        """This process's local step ``step`` onto ``target``, and the iterator's position;
        ``select``: a subtree only (a one-process step only).

        Raises:
            CorruptCheckpointError: the step is damaged.
            TargetMismatchError: it was saved by other processes or on another mesh, or
                ``select`` on one process's shards.
        """
        try:
            return self._restore(step, target, data_iterator, select)
        except CorruptCheckpointError:
            self._damaged.add(step)  # moved aside, not deleted, if a new save needs its name
            raise

    def _restore(
        self, step: int, target: Any, data_iterator: CheckpointableIterator | None, select: Any
    ) -> Any:
        path = self.step_path(step)
        saved = read_commit_record(self.storage, path).step
        if saved != step:
            raise ManifestError(
                f"{path} holds the checkpoint of step {saved}, not {step}: something moved "
                "files between steps; it is not restored"
            )
        if is_own_shards(self.storage, path):
            if select is not None:
                raise TargetMismatchError(
                    f"{path} holds one process's shards, which restore whole only: restore "
                    "without select, or the subtree from the persistent tier"
                )
            state = restore_own(self.storage, path, target)
            saved_by = 1  # a local step holds this process's iterator state only
        else:
            with open_checkpoint(path, self.storage) as reader:
                state = restore_from(reader, target, select)
            saved_by = None
        if data_iterator is not None:
            restore_iterator(self.storage, path, data_iterator, process_index(), saved_by)
        return state
