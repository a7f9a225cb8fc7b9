"""Multi-tier checkpointing's promoter: committed local steps copied to the persistent tier.

Saves go to the local disk only (fast); every backup interval (steps, or minutes) the newest
committed local step is promoted to the persistent tier, in a thread of its own: training never
waits for it. One process copies the step's files as they are (``checkpoint/copy_step.py``);
when a newer step is ready before the previous copy started, the older one is skipped (its copy
would be out of date before it finished). Under several processes each local step holds one
process's shards (``checkpoint/own_shards.py``), so each process reads its own back and the
job writes them as one checkpoint, every process its part, process 0 committing (the save
protocol of ``checkpoint/collective_save.py``); every process promotes the same steps in the
same order (the choice is made when the save starts, by process 0 for a backup interval in
minutes), none skipped, since a skip on one process would leave the others waiting.

A step waiting for promotion or being promoted is kept by local retention until it is over. A
promotion that fails is logged at ERROR and the next one is tried: the local step stays, and
the persistent tier keeps its last committed step, never a half-written one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from stepsafe.checkpoint import snapshot, write
from stepsafe.checkpoint.copy_step import copy_step
from stepsafe.checkpoint.own_shards import is_own_shards, restore_own
from stepsafe.checkpoint.run_layout import step_name
from stepsafe.checkpoint.save import take_part
from stepsafe.distributed import is_multiprocess
from stepsafe.distributed.outcomes import on_process_0
from stepsafe.errors import ManifestError
from stepsafe.format.step_files import read_commit_record, read_extra
from stepsafe.manager.async_writer import finish_after_writers_at_exit
from stepsafe.manager.iterator_state import ITER_DIR
from stepsafe.manager.local_tier import LocalTier
from stepsafe.storage import Storage

log = logging.getLogger("stepsafe")


class Promoter:
    """Copies committed local steps to the persistent tier (``storage``, ``directory``) every
    ``every_steps`` steps or ``every_minutes`` minutes (exactly one is set). ``blocked(step)``,
    run on process 0 before each promotion, says whether the step must not be written (it is
    there already, or its name holds something else; it raises when the run's lease was lost),
    as for any save; ``retention`` runs after each promotion (the persistent tier's
    ``max_to_keep``); ``file_size`` splits data files when several processes write a step."""

    def __init__(
        self,
        local: LocalTier,
        storage: Storage,
        directory: str,
        *,
        every_steps: int | None,
        every_minutes: float | None,
        blocked: Callable[[int], bool],
        retention: Callable[[], None],
        last_step: int | None,
        file_size: int | None = None,
    ) -> None:
        self.local, self.storage, self.directory = local, storage, directory
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.blocked, self.retention, self.file_size = blocked, retention, file_size
        self._last_step = last_step  # the newest step chosen (or found persistent at start)
        self._last_time = time.monotonic()
        self._lock = threading.Condition()
        self._queue: list[int] = []  # steps to promote, oldest first
        self._running: int | None = None
        self._together = is_multiprocess()  # every process promotes every chosen step
        self._thread: threading.Thread | None = None
        self.promoted: list[int] = []  # in order, for logs and tests
        self.failed: list[tuple[int, str]] = []
        finish_after_writers_at_exit(self)  # the last promotion finishes before exit

    def due(self, step: int, force: bool = False) -> bool:
        """Whether local step ``step``, once committed, is to be promoted (decided when the
        save starts; the interval counts from the last step chosen)."""
        if self.every_steps is not None:
            due = self._last_step is None or step - self._last_step >= self.every_steps
        else:
            minutes = self.every_minutes or 0.0

            def clock() -> bool:
                return time.monotonic() - self._last_time >= minutes * 60

            due = on_process_0(f"promote-due-{self.local.tag}-{step}", clock)
        if due or force:
            self._last_step, self._last_time = step, time.monotonic()
        return due or force

    def offer(self, step: int) -> None:
        """Promote ``step`` (committed locally) in the background, in place of any older step
        still waiting."""
        with self._lock:
            if self._queue and not self._together:
                log.info(
                    "Promotion of local step %d skipped: step %d is ready", self._queue[0], step
                )
                self._queue.clear()
            self._queue.append(step)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="stepsafe-promoter", daemon=False
                )
                self._thread.start()
            self._lock.notify_all()

    def pinned(self) -> set[int]:
        """The local steps that must stay: waiting for their copy, or being copied."""
        with self._lock:
            return set(self._queue) | ({self._running} if self._running is not None else set())

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    self._lock.notify_all()
                    return
                step = self._running = self._queue.pop(0)
            try:
                self._promote(step)
            except Exception as e:  # never lost: logged, and the next step is tried
                self.failed.append((step, f"{type(e).__name__}: {e}"))
                log.error(
                    "Promotion of local step %d to %s failed (%s: %s); the local step and the "
                    "persistent tier's last step are intact, the next promotion tries again",
                    step, self.directory, type(e).__name__, e,
                )  # fmt: skip
            finally:
                with self._lock:
                    self._running = None
                self.local.apply_retention()  # the step is no longer held for its copy

    def _promote(self, step: int) -> None:
        dst = self.storage.join(self.directory, step_name(step))
        if on_process_0(f"promote-{self.local.tag}-{step}", lambda: self.blocked(step)):
            return  # logged by ``blocked``
        t0 = time.perf_counter()
        if self._together:
            copied = self._write_together(step, dst)
        else:
            src = self.local.step_path(step)
            copied = copy_step(self.local.storage, src, self.storage, dst, step=step)
        self.promoted.append(step)
        log.info(
            "Promoted local step %d to %s (%.1f MB in %.3f s)",
            step, dst, copied / 1e6, time.perf_counter() - t0,
        )  # fmt: skip
        self.retention()

    def _write_together(self, step: int, dst: str) -> int:
        """Every process writes its part of step ``step`` from its own local step; process 0
        commits. A process whose local step fails to read still takes part (with its error),
        so that every process learns the same outcome."""
        src, storage = self.local.step_path(step), self.local.storage

        def capture() -> tuple:
            if not is_own_shards(storage, src):
                raise ValueError(f"{src} does not hold one process's shards")
            record = read_commit_record(storage, src)
            if record.step != step:
                raise ManifestError(f"{src} holds the checkpoint of step {record.step}")
            state = restore_own(storage, src, None, as_saved=True)
            extra = {
                name: read_extra(storage, src, name, record) or b""
                for name in record.extra_files
                if name.startswith(f"{ITER_DIR}/")
            }
            return snapshot(state), extra, record

        snap, extra, record = take_part(dst, capture, self.storage)
        write(
            dst, snap, custom_metadata=record.custom_metadata, step=step, extra_files=extra,
            metrics=record.metrics, data_file_size_bytes=self.file_size, storage=self.storage,
        )  # fmt: skip
        return snap.nbytes

    def wait(self) -> None:
        """Block until no promotion waits or runs."""
        with self._lock:
            while self._thread is not None:
                self._lock.wait()

    def _finish_at_exit(self) -> None:
        self.wait()  # a failure was logged where it happened

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._thread is not None
