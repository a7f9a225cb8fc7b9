"""A training run's checkpoints: when to save, where, how many to keep, in the background.

    <base_output_directory>/<run_name>/checkpoints/<step>/{_CHECKPOINT_METADATA, items/, iter/}

With ``async_save`` the caller is blocked only while the state is captured (a copy: JAX may
donate and reuse device buffers the moment ``save`` returns; on accelerators the copy is made on
the device, and the writer brings it to host); the write runs in the background, one at a time.
Old checkpoints are deleted only after a newer one is committed.

A manager that saves holds the run directory's lease (lease.py) from its start to ``close``:
a second one on the same run is refused. Managers that only read (an evaluator) pass
``enable_checkpointing=False`` and take none. Its options are options.py's; what it does with
the steps already there, existing_steps.py's; how it resumes, resume.py's.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from typing import Any

from stepsafe.arrays import StagingBuffers
from stepsafe.arrays.single_replica import SingleReplica
from stepsafe.checkpoint import committed_steps, snapshot, write
from stepsafe.checkpoint.run_layout import CHECKPOINTS_DIR, check_step, step_name
from stepsafe.checkpoint.save import Snapshot, check_custom_metadata, check_metrics, take_part
from stepsafe.distributed import is_multiprocess, process_index
from stepsafe.distributed.outcomes import on_process_0
from stepsafe.errors import RunInUseError
from stepsafe.format import CommitRecord
from stepsafe.manager.async_writer import AsyncWriter
from stepsafe.manager.existing_steps import PassedSteps, apply_retention, save_is_blocked
from stepsafe.manager.gc import remove_half_deleted
from stepsafe.manager.inventory import COMPLETE, INCOMPLETE, scan_steps
from stepsafe.manager.iterator_state import CheckpointableIterator, iterator_files
from stepsafe.manager.lease import Lease
from stepsafe.manager.local_save import save_local
from stepsafe.manager.options import ManagerOptions
from stepsafe.manager.restoring import Restoring
from stepsafe.manager.retention_policy import policy_of
from stepsafe.manager.step_delete import delete_for_job
from stepsafe.manager.tier_setup import local_tier_for, promoter_for
from stepsafe.storage import remove_stale_temporaries, storage_for

log = logging.getLogger("stepsafe")


def run_checkpoint_dir(base_output_directory: str, run_name: str) -> str:
    """``<base_output_directory>/<run_name>/checkpoints``: where MaxText keeps a run's steps."""
    storage, base = storage_for(str(base_output_directory))
    return storage.join(base, run_name, CHECKPOINTS_DIR)


class CheckpointManager(Restoring):
    """A training run's checkpoints: saves every ``save_interval_steps``, in the background,
    keeps the newest ``max_to_keep``, and resumes from the newest step that restores.

    Starting a manager that saves takes the run's lease and removes the leftovers of saves and
    deletions that a killed process interrupted (never a committed step); damaged, linked and
    foreign steps are logged and left in place. Use it as a context manager, or call ``close``.

    Under ``jax.distributed`` every process makes the same calls in the same order (``save``,
    ``restore``, ``all_steps``, ...): process 0 holds the lease, lists the steps, decides
    whether a step is saved and deletes old ones; every process writes its own shards and data
    iterator state, and learns the same outcome.

    Args:
        directory (`str`): the run's ``checkpoints`` directory (``run_checkpoint_dir``), local
            or an ``s3://`` / ``gs://`` URL; a saving manager creates it (for its lease).
        options (`ManagerOptions`, *optional*): when and how to save; None: the defaults.

    Raises:
        RunInUseError: another live manager holds this run's lease (only when saving is
            enabled, on the primary process).
        CredentialsError: a bucket URL and no credentials for it.

    Example:

    ```python
    from stepsafe import CheckpointManager, ManagerOptions

    options = ManagerOptions(save_interval_steps=100, max_to_keep=3)
    with CheckpointManager("outputs/run1/checkpoints", options) as manager:
        start = 0
        if manager.latest_step() is not None:
            start, state = manager.restore_newest(abstract_state)
        for step in range(start + 1, 1001):
            state = train_step(state)
            manager.save(step, state)  # steps 100, 200, ... are saved in the background
    ```
    """

    def __init__(self, directory: str, options: ManagerOptions | None = None) -> None:
        self.options = options or ManagerOptions()
        # The run's storage, with its own transfer budget when the options give one.
        self.storage, self.directory = storage_for(str(directory), self.options.concurrent_bytes)
        # One writing manager per run, taken before anything below may delete leftovers.
        self._lease = (
            Lease.acquire(self.storage, self.directory)
            if self.options.enable_checkpointing and process_index() == 0
            else None
        )
        self._release = weakref.finalize(self, self._lease.release) if self._lease else None
        self._single_replica = (
            SingleReplica(self.options.replica_axis_index)
            if self.options.enable_single_replica_ckpt_restoring
            else None
        )  # restores read on replica 0 only and broadcast to the others
        self._index = process_index()
        self._tag = hashlib.sha256(self.directory.encode()).hexdigest()[:12]  # names exchanges
        self._passed = PassedSteps()  # damaged, linked, foreign steps: left in place, said once
        self._writer = AsyncWriter()
        self._staging = StagingBuffers()  # async snapshots reuse last save's host buffers
        self.last_save_seconds: tuple[float, float] | None = None  # (blocked, total)
        self.restored_path = ""  # where restore_newest found its step (either tier)
        if self._lease is not None and self.storage.is_dir(self.directory):
            # Only the run's writer cleans up: a reader must not delete what it did not write.
            for path in remove_stale_temporaries(self.directory):
                log.info("Removed the leftovers of an interrupted save: %s", path)
            for path in remove_half_deleted(self.storage, self.directory):
                log.info("Removed the leftovers of an interrupted deletion: %s", path)
            for entry in scan_steps(self.storage, self.directory, sizes=False):
                if entry.status not in (COMPLETE, INCOMPLETE):
                    self._passed.report(entry)
        self.local = local_tier_for(self.options, self._tag, self.storage, self.directory)
        self._promoter = promoter_for(
            self.options, self.local, self.storage, self.directory, self._save_is_blocked,
            self._apply_retention,
        )  # fmt: skip

    # -- what exists -------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (in-flight and interrupted saves are not listed).

        Returns:
            `list[int]`: e.g. ``[100, 200, 300]``; damaged committed steps are listed too.
        """
        return on_process_0(
            f"steps-{self._tag}", lambda: committed_steps(self.storage, self.directory)
        )

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is none: ``all_steps()[-1]``, or with
        a local tier the newest step of either tier that every process holds."""
        steps = self.all_steps()
        if self.local is not None:
            steps = sorted(set(steps) | set(self.local.common_steps()))
        return steps[-1] if steps else None

    def local_steps(self) -> list[int]:
        """This process's committed local-tier steps, oldest first (none without one)."""
        return [] if self.local is None else self.local.steps()

    def step_path(self, step: int) -> str:
        """Where ``step`` lives: ``<directory>/<step>``, a path ``stepsafe.restore`` takes."""
        return self.storage.join(self.directory, step_name(step))

    # -- saving ------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` saves: checkpointing is enabled and ``step`` is a
        multiple of ``save_interval_steps`` (persistent tier; not in multi-tier mode, which
        saves locally only) or of ``local_save_interval_steps`` (local tier)."""
        o = self.options
        persistent = not o.multi_tier and step % o.save_interval_steps == 0
        local = self.local is not None and self.local.should_save(step)
        return o.enable_checkpointing and (persistent or local)

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iterator: CheckpointableIterator | None = None,
        custom_metadata: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` as ``step`` if the period says so (or ``force``).

        With ``async_save`` the call returns once ``state`` is captured (a copy: the caller may
        change or donate its buffers at once) and the write runs in the background; the
        previous background save is waited for first. A step that already exists, committed,
        damaged or another tool's, is never overwritten: it is logged and not saved.

        Args:
            step (`int`): the training step; the checkpoint goes to ``step_path(step)``.
            state (`Any`): the pytree to save (as ``stepsafe.save`` takes it).
            data_iterator (`CheckpointableIterator`, *optional*): an object with
                ``get_state()``; its state (bytes or JSON) is saved under ``<step>/iter/``.
            custom_metadata (`dict`, *optional*): a JSON-serialisable dict stored with the step
                (copied now: the caller may change its dict while the save runs).
            metrics (`dict`, *optional*): str -> finite number (e.g. ``{"loss": 1.23}``),
                stored in the step's commit record (``stepsafe ls`` shows them), what
                ``ManagerOptions.best_fn`` scores for retention by metric.
            force (`bool`, defaults to `False`): save even if ``step`` is not on the period
                (the final step, or on a stop request); never when checkpointing is disabled.

        Returns:
            `bool`: True if a save was started (with ``async_save``) or committed (without).

        Raises:
            UnsupportedLeafError: ``custom_metadata`` or the iterator's state is not
                JSON-serialisable, ``metrics`` is not a dict of str -> finite number, or
                ``state`` holds a leaf that cannot be saved (checked before anything is
                written).
            BackgroundSaveError: the previous background save failed (raised once).
            RunInUseError: another manager has taken this run's lease over.
            ConfigError: ``step`` is not a non-negative integer (Python, numpy or JAX).
            CoordinationError: under several JAX processes, another did not answer in time.

        Example:

        ```python
        for step in range(1, 1001):
            state = train_step(state)
            manager.save(step, state, data_iterator=data, custom_metadata={"loss": float(loss)})
        manager.save(step, state, force=True)  # the last step, whatever the period
        ```
        """
        custom_metadata = check_custom_metadata(custom_metadata)
        metrics = check_metrics(metrics)
        if not self.options.enable_checkpointing:
            return False
        step = check_step(step)  # a numpy or JAX integer too; never one no listing counts
        saved = False
        if self.local is not None and (force or self.local.should_save(step)):
            saved = self._save_local(step, state, data_iterator, custom_metadata, metrics, force)
        if self.options.multi_tier or not (force or step % self.options.save_interval_steps == 0):
            return saved
        return self._save_persistent(step, state, data_iterator, custom_metadata, metrics) or saved

    def _save_local(
        self,
        step: int,
        state: Any,
        data_iterator: CheckpointableIterator | None,
        custom_metadata: dict[str, Any] | None,
        metrics: dict[str, float] | None,
        force: bool,
    ) -> bool:
        assert self.local is not None
        record = CommitRecord(
            step=step, custom_metadata=dict(custom_metadata or {}), metrics=dict(metrics or {})
        )
        return save_local(
            self.local, self._promoter, step, state, data_iterator=data_iterator,
            record=record, background=self.options.async_save, force=force,
            check_lease=self._check_lease,
        )  # fmt: skip

    def _save_persistent(
        self,
        step: int,
        state: Any,
        data_iterator: CheckpointableIterator | None,
        custom_metadata: dict[str, Any] | None,
        metrics: dict[str, float] | None,
    ) -> bool:
        lost = self._lease_lost()  # first: a forked child's writer thread does not exist
        if lost is None:
            self._writer.wait()
        elif not is_multiprocess():
            raise lost

        t0 = time.perf_counter()  # the caller's time from here (the check lists the step)
        # process 0 decides for the job: a lost lease fails everyone
        if on_process_0(f"save-{self._tag}-{step}", lambda: self._save_is_blocked(step)):
            return False

        def capture() -> tuple[Snapshot, dict[str, bytes] | None]:
            snap = snapshot(state, copy=self.options.async_save, staging=self._staging)
            return snap, None if data_iterator is None else iterator_files(
                data_iterator, self._index
            )

        snap, extra = take_part(self.step_path(step), capture, self.storage)
        blocked = [time.perf_counter() - t0]  # async: updated once the writer has started

        def job() -> None:
            write(
                self.step_path(step),
                snap,
                custom_metadata=custom_metadata,
                step=step,
                extra_files=extra,
                metrics=metrics,
                data_file_size_bytes=self.options.data_file_size_bytes,
                storage=self.storage,
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

    def _save_is_blocked(self, step: int) -> bool:
        """Whether ``step`` must not be written to the persistent tier (process 0 only): the
        lease is lost (raised), or the step exists or its name holds something else (logged)."""
        self._check_lease()
        return save_is_blocked(self.storage, self.directory, step, self._passed)

    def _check_lease(self) -> None:
        """Raise ``RunInUseError`` when another manager has taken this run's lease over."""
        lost = self._lease_lost()
        if lost is not None:
            raise lost

    def _apply_retention(self) -> None:
        """The persistent tier's retention, on the run's one writer (process 0)."""
        if self._lease is not None:
            apply_retention(
                self.storage, self.directory, self.options.max_to_keep, self._passed,
                policy_of(self.options),
            )  # fmt: skip

    def _lease_lost(self) -> RunInUseError | None:
        """Why this manager may no longer write the run (its lease was taken over), or None."""
        if self._lease is None:
            return None
        try:
            self._lease.check()
        except RunInUseError as e:
            return e
        return None

    def delete(self, step: int) -> None:
        """Delete committed step ``step`` as retention would (marker first), after the
        in-flight save; process 0 deletes, every process returns or raises alike.

        Raises:
            CheckpointNotFoundError: there is no step ``step``.
            DeletionError: not a committed stepsafe step of ours (unfinished, a link, another
                tool's, holding files stepsafe did not write), the storage refused, or this
                manager only reads (``enable_checkpointing=False``).
            RunInUseError: another manager has taken this run's lease over.
        """
        step = check_step(step)
        self._wait_all()
        name, lost = f"delete-{self._tag}-{step}", self._lease_lost()
        read_only = not self.options.enable_checkpointing
        delete_for_job(name, self.storage, self.directory, step, lost, read_only)
        self._passed.damaged.discard(step)

    def wait_until_finished(self) -> None:
        """Block until the in-flight save is committed; raise if it failed.

        Interrupted (Ctrl+C), the save keeps running: call this again to wait for it and learn
        its outcome; the interpreter also waits for it before exiting.

        Raises:
            BackgroundSaveError: the background save failed (raised once; its cause is the
                original error); the step was not committed, earlier ones are intact.
        """
        self._wait_all()

    def _wait_all(self) -> None:
        """The persistent save, the local one and the promotion in flight (each error once)."""
        try:
            self._writer.wait()
        finally:
            if self.local is not None:
                self.local.wait()
            if self._promoter is not None:
                self._promoter.wait()

    def close(self) -> None:
        """Wait for the in-flight save, then release the run's lease (kept while a save still
        runs, e.g. when this wait is interrupted: it is then released once the save is over,
        at garbage collection or at exit). ``with CheckpointManager(...)`` calls it.

        Raises:
            BackgroundSaveError: as ``wait_until_finished`` (the lease is released anyway).
        """
        try:
            self.wait_until_finished()
        finally:
            busy = self._writer.busy or (self._promoter is not None and self._promoter.busy)
            if self._release is not None and not busy:
                self._release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()
