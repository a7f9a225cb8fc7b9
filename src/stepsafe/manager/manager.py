"""A training run's checkpoints: when to save, where, how many to keep, in the background.

    <base_output_directory>/<run_name>/checkpoints/<step>/{_CHECKPOINT_METADATA, items/, iter/}

With ``async_save`` the caller is blocked only while the state is captured (a copy: JAX may
donate and reuse device buffers the moment ``save`` returns; on accelerators the copy is made on
the device, and the writer brings it to host); the write runs in the background, one at a time.
Old checkpoints are deleted only after a newer one is committed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from stepsafe.arrays import StagingBuffers
from stepsafe.checkpoint import committed_steps, restore, snapshot, write
from stepsafe.checkpoint.locate import CHECKPOINTS_DIR
from stepsafe.errors import CheckpointNotFoundError
from stepsafe.format import delete_checkpoint
from stepsafe.manager.async_writer import AsyncWriter
from stepsafe.manager.iterator_state import (
    CheckpointableIterator,
    iterator_files,
    restore_iterator,
)
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
        self._writer = AsyncWriter()
        self._staging = StagingBuffers()  # async snapshots reuse last save's host buffers
        self.last_save_seconds: tuple[float, float] | None = None  # (blocked, total)
        if self.storage.is_dir(self.directory):
            for path in remove_stale_temporaries(self.directory):
                log.info("Removed the leftovers of an interrupted save: %s", path)

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

        Raises the failure of the previous background save, if any, before starting this one.
        """
        if not self.options.enable_checkpointing or not (force or self.should_save(step)):
            return False
        self._writer.wait()
        if step in self.all_steps():
            log.info("Checkpoint at step %d already exists; not saving it again", step)
            return False
        t0 = time.perf_counter()
        snap = snapshot(state, copy=self.options.async_save, staging=self._staging)
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

    def _apply_retention(self) -> None:
        keep = self.options.max_to_keep
        steps = self.all_steps()
        if keep <= 0 or len(steps) <= keep:
            return
        for step in steps[:-keep]:
            delete_checkpoint(self.storage, self.step_path(step))
            log.info("Deleted old checkpoint at step %d (keeping %d)", step, keep)

    def wait_until_finished(self) -> None:
        """Block until the in-flight save is committed; raise if it failed."""
        self._writer.wait()

    def close(self) -> None:
        self.wait_until_finished()

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
        """Restore ``step`` (default: the latest committed) and the data iterator's position."""
        self._writer.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointNotFoundError(f"no committed checkpoint under {self.directory}")
        path = self.step_path(step)
        state = restore(path, target)
        if data_iterator is not None:
            restore_iterator(self.storage, path, data_iterator)
        log.info("Restored step %d from %s", step, path)
        return state
