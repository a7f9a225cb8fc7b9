"""A training run's checkpoints: when to save, where, how many to keep, in the background.

    <base_output_directory>/<run_name>/checkpoints/<step>/{_CHECKPOINT_METADATA, items/, iter/}

With ``async_save`` the caller is blocked only while the state is captured (a copy: JAX may
donate and reuse device buffers the moment ``save`` returns; on accelerators the copy is made on
the device, and the writer brings it to host); the write runs in the background, one at a time.
Old checkpoints are deleted only after a newer one is committed.

A manager that saves holds the run directory's lease (lease.py) from its start to ``close``:
a second one on the same run is refused. Managers that only read (an evaluator) pass
``enable_checkpointing=False`` and take none.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

from stepsafe.arrays import StagingBuffers
from stepsafe.checkpoint import committed_steps, restore, snapshot, write
from stepsafe.checkpoint.locate import CHECKPOINTS_DIR
from stepsafe.checkpoint.save import json_metadata
from stepsafe.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StepsafeError,
)
from stepsafe.format import delete_checkpoint
from stepsafe.manager.async_writer import AsyncWriter
from stepsafe.manager.gc import plan_retention, remove_half_deleted
from stepsafe.manager.inventory import (
    COMPLETE,
    DAMAGED,
    INCOMPLETE,
    UNREADABLE,
    StepEntry,
    scan_step,
    scan_steps,
)
from stepsafe.manager.iterator_state import (
    CheckpointableIterator,
    iterator_files,
    restore_iterator,
)
from stepsafe.manager.lease import Lease, primary_process
from stepsafe.storage import remove_stale_temporaries, set_concurrent_bytes, storage_for

log = logging.getLogger("stepsafe")


def run_checkpoint_dir(base_output_directory: str, run_name: str) -> str:
    storage, base = storage_for(str(base_output_directory))
    return storage.join(base, run_name, CHECKPOINTS_DIR)


@dataclass(frozen=True)
class ManagerOptions:
    enable_checkpointing: bool = True
    async_save: bool = True
    save_interval_steps: int = 10000
    max_to_keep: int = 0  # 0: keep all
    data_file_size_bytes: int | None = None  # None: the storage's default
    concurrent_bytes: int | None = None  # bytes in flight to/from buckets, per process

    def __post_init__(self) -> None:
        if self.save_interval_steps < 1:
            raise ValueError(f"checkpoint_period must be >= 1, got {self.save_interval_steps}")
        if self.max_to_keep < 0:
            raise ValueError(f"max_num_checkpoints_to_keep must be >= 0, got {self.max_to_keep}")
        if self.concurrent_bytes is not None and self.concurrent_bytes < 1:
            raise ValueError(f"concurrent_bytes must be >= 1, got {self.concurrent_bytes}")


class CheckpointManager:
    def __init__(self, directory: str, options: ManagerOptions | None = None) -> None:
        self.storage, self.directory = storage_for(str(directory))
        self.options = options or ManagerOptions()
        if self.options.concurrent_bytes is not None:
            set_concurrent_bytes(self.options.concurrent_bytes)
        # One writing manager per run, taken before anything below may delete leftovers.
        self._lease = (
            Lease.acquire(self.storage, self.directory)
            if self.options.enable_checkpointing and primary_process()
            else None
        )
        self._release = weakref.finalize(self, self._lease.release) if self._lease else None
        self._damaged: set[int] = set()  # steps a restore found damaged (left in place)
        self._writer = AsyncWriter()
        self._staging = StagingBuffers()  # async snapshots reuse last save's host buffers
        self.last_save_seconds: tuple[float, float] | None = None  # (blocked, total)
        self._reported: set[str] = set()  # steps retention kept and logged why, once each
        if self._lease is not None and self.storage.is_dir(self.directory):
            # Only the run's writer cleans up: a reader must not delete what it did not write.
            for path in remove_stale_temporaries(self.directory):
                log.info("Removed the leftovers of an interrupted save: %s", path)
            for path in remove_half_deleted(self.storage, self.directory):
                log.info("Removed the leftovers of an interrupted deletion: %s", path)
            for entry in scan_steps(self.storage, self.directory, sizes=False):
                if entry.status not in (COMPLETE, INCOMPLETE):
                    self._report(entry)

    def _report(self, entry: StepEntry) -> None:
        """Say once, loudly, that a step is passed by (damaged, a link, another tool's): a run
        that silently resumed from an older step would look like lost work."""
        if entry.name in self._reported:
            return
        self._reported.add(entry.name)
        if entry.status == DAMAGED:
            self._damaged.add(entry.step)
        level = logging.ERROR if entry.status in (DAMAGED, UNREADABLE) else logging.WARNING
        log.log(
            level, "Step %s (%s) is %s: %s; it is left in place, and resumes and retention "
            "pass it by", entry.name, entry.path, entry.status, entry.detail,
        )  # fmt: skip

    # -- what exists -------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (in-flight and interrupted saves are not listed)."""
        return committed_steps(self.storage, self.directory)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_path(self, step: int) -> str:
        return self.storage.join(self.directory, str(step))

    # -- saving ------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        return self.options.enable_checkpointing and step % self.options.save_interval_steps == 0

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iterator: CheckpointableIterator | None = None,
        metadata: dict[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` as ``step`` if the period says so (or ``force``); True if started.

        ``metadata``: a JSON-serialisable dict, stored with the step (copied now: the caller
        may change its dict while the save runs in the background).

        Raises:
            UnsupportedLeafError: ``metadata`` is not JSON-serialisable (checked at every call,
                before anything is captured).
            BackgroundSaveError: the previous background save failed (raised once).
            RunInUseError: another manager has taken this run's lease over.
        """
        metadata = json_metadata(metadata)
        if not self.options.enable_checkpointing or not (force or self.should_save(step)):
            return False
        if self._lease is not None:  # first: a forked child's writer thread does not exist
            self._lease.check()
        self._writer.wait()
        if step in self.all_steps():
            if step in self._damaged:
                log.error(
                    "Checkpoint at step %d exists but is damaged; it is not overwritten, so this "
                    "step is not saved again (move %s aside to save it)",
                    step, self.step_path(step),
                )  # fmt: skip
            else:
                log.info("Checkpoint at step %d already exists; not saving it again", step)
            return False
        occupied = self._occupied(step)
        if occupied is not None:
            self._report(occupied)
            log.error(
                "Step %d is not saved: %s holds something that is not a committed checkpoint "
                "(%s); stepsafe never overwrites it: move it aside to save this step",
                step, occupied.path, occupied.status,
            )  # fmt: skip
            return False
        t0 = time.perf_counter()
        snap = snapshot(
            state, copy=self.options.async_save, staging=self._staging, path=self.step_path(step)
        )
        extra = iterator_files(data_iterator) if data_iterator is not None else None
        blocked = [time.perf_counter() - t0]  # async: updated once the writer has started

        def job() -> None:
            write(
                self.step_path(step),
                snap,
                metadata=metadata,
                step=step,
                extra_files=extra,
                data_file_size_bytes=self.options.data_file_size_bytes,
            )
            total = time.perf_counter() - t0
            log.info(
                "Saved checkpoint at step %d (%.1f MB, blocked %.3f s, total %.3f s)",
                step, snap.nbytes / 1e6, blocked[0], total,
            )  # fmt: skip
            self.last_save_seconds = (blocked[0], total)
            self._apply_retention()

        if self.options.async_save:
            self._writer.submit(f"step {step}", job)
            blocked[0] = time.perf_counter() - t0  # starting the writer is the caller's time too
        else:
            job()
        return True

    def _occupied(self, step: int) -> StepEntry | None:
        """What blocks a save of ``step``: a damaged, linked or foreign entry under its name
        (an unfinished save of ours is no block: a bucket save writes beside it, and a local
        one into a temporary of its own)."""
        path = self.step_path(step)
        if not (self.storage.exists(path) or self.storage.is_link(path)):
            return None
        entry = scan_step(self.storage, path, str(step), step, sizes=False)
        return None if entry.status in (COMPLETE, INCOMPLETE) else entry

    def _apply_retention(self) -> None:
        """Delete committed steps beyond the newest ``max_to_keep`` intact ones (``plan_gc``'s
        rules: damaged, linked and foreign steps are kept and not counted). Runs after a save
        committed, so nothing here may fail that save: a step another deleter (``stepsafe gc``)
        removed first is gone as wanted, and a deletion the storage refuses is logged."""
        keep = self.options.max_to_keep
        if keep <= 0 or len(self.all_steps()) <= keep:
            return
        plan = plan_retention(self.storage, self.directory, keep, self._damaged)
        for a in plan.attention:
            if a.entry.name not in self._reported:
                self._reported.add(a.entry.name)
                level = logging.ERROR if a.entry.status == DAMAGED else logging.WARNING
                log.log(level, "Kept checkpoint %s: %s", a.entry.path, a.reason)
        for a in plan.delete:
            try:
                delete_checkpoint(self.storage, a.entry.path)
            except (OSError, StepsafeError) as e:
                log.error("Could not delete old checkpoint %s: %s", a.entry.path, e)
                continue
            log.info("Deleted old checkpoint at step %d (keeping %d)", a.entry.step, keep)

    def wait_until_finished(self) -> None:
        """Block until the in-flight save is committed; raise if it failed.

        Interrupted (Ctrl+C), the save keeps running: call this again to wait for it and learn
        its outcome; the interpreter also waits for it before exiting.
        """
        self._writer.wait()

    def close(self) -> None:
        """Wait for the in-flight save, then release the run's lease (kept while a save still
        runs, e.g. when this wait is interrupted: it is then released once the save is over,
        at garbage collection or at exit)."""
        try:
            self.wait_until_finished()
        finally:
            if self._release is not None and not self._writer.busy:
                self._release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    # -- restoring ---------------------------------------------------------------------------
    def restore(
        self,
        step: int | None = None,
        target: Any = None,
        *,
        data_iterator: CheckpointableIterator | None = None,
    ) -> Any:
        """Restore ``step`` and the data iterator's position; ``step=None``: the newest
        committed step that restores (see ``restore_newest``).

        Raises:
            CheckpointNotFoundError: there is no committed step.
            CorruptCheckpointError: ``step`` (or, for None, every committed step) is damaged.
        """
        if step is None:
            return self.restore_newest(target, data_iterator=data_iterator)[1]
        self._writer.wait()
        return self._restore_step(step, target, data_iterator)

    def restore_newest(
        self, target: Any = None, *, data_iterator: CheckpointableIterator | None = None
    ) -> tuple[int, Any]:
        """(step, state) of the newest committed step that restores.

        A resume must not stop at a damaged latest step (a flipped bit, a truncated file) when
        an older one is intact: the damaged step is logged at ERROR and skipped, and left in
        place, untouched, for the user to inspect (``stepsafe verify``); nothing is deleted.

        Raises:
            CheckpointNotFoundError: there is no committed step.
            CorruptCheckpointError: every committed step is damaged.
        """
        self._writer.wait()
        steps = self.all_steps()
        if not steps:
            raise CheckpointNotFoundError(f"no committed checkpoint under {self.directory}")
        errors: list[tuple[int, CorruptCheckpointError]] = []
        for step in reversed(steps):
            try:
                state = self._restore_step(step, target, data_iterator)
            except CorruptCheckpointError as e:
                errors.append((step, e))
                self._damaged.add(step)
                log.error(
                    "Checkpoint at step %d cannot be restored, it is damaged (%s: %s); it was "
                    "left in place (check it with `stepsafe verify %s`); trying the step before",
                    step, type(e).__name__, e, self.step_path(step),
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
            f"every committed checkpoint under {self.directory} is damaged (steps "
            f"{', '.join(str(s) for s, _ in errors)}); nothing was deleted: check them with "
            "`stepsafe verify`, or move them aside to start from scratch"
        ) from errors[0][1]

    def _restore_step(
        self, step: int, target: Any, data_iterator: CheckpointableIterator | None
    ) -> Any:
        path = self.step_path(step)
        state = restore(path, target)
        if data_iterator is not None:
            restore_iterator(self.storage, path, data_iterator)
        log.info("Restored step %d from %s", step, path)
        return state
