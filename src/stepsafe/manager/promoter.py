"""Multi-tier checkpointing's promoter: committed local steps copied to the persistent tier.

Saves go to the local disk only (fast); every backup interval (steps, or minutes) the newest
committed local step is copied, files as they are (``checkpoint/copy_step.py``), to the
persistent tier, in a thread of its own: training never waits for it. When a newer step is
ready before the previous copy started, the older one is skipped (its copy would be out of
date before it finished). A step being copied is kept by local retention until the copy is
over. A copy that fails is logged at ERROR and the next one is tried: the local step stays,
and the persistent tier keeps its last committed step, never a half-copied one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from stepsafe.checkpoint import committed_steps
from stepsafe.checkpoint.copy_step import copy_step
from stepsafe.checkpoint.run_layout import step_name
from stepsafe.manager.local_tier import LocalTier
from stepsafe.storage import Storage

log = logging.getLogger("stepsafe")


class Promoter:
    """Copies committed local steps to the persistent tier (``storage``, ``directory``) every
    ``every_steps`` steps or ``every_minutes`` minutes (exactly one is set); ``retention``
    runs after each copy (the persistent tier's ``max_to_keep``)."""

    def __init__(
        self,
        local: LocalTier,
        storage: Storage,
        directory: str,
        *,
        every_steps: int | None,
        every_minutes: float | None,
        retention: Callable[[], None],
        last_step: int | None,
    ) -> None:
        self.local, self.storage, self.directory = local, storage, directory
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.retention = retention
        self._last_step = last_step  # the newest step chosen (or found persistent at start)
        self._last_time = time.monotonic()
        self._lock = threading.Condition()
        self._pending: int | None = None
        self._running: int | None = None
        self._thread: threading.Thread | None = None
        self.promoted: list[int] = []  # in order, for logs and tests
        self.failed: list[tuple[int, str]] = []

    def due(self, step: int, force: bool = False) -> bool:
        """Whether local step ``step``, once committed, is to be promoted (decided when the
        save starts; the interval counts from the last step chosen)."""
        if self.every_steps is not None:
            due = self._last_step is None or step - self._last_step >= self.every_steps
        else:
            assert self.every_minutes is not None
            due = time.monotonic() - self._last_time >= self.every_minutes * 60
        if due or force:
            self._last_step, self._last_time = step, time.monotonic()
        return due or force

    def offer(self, step: int) -> None:
        """Promote ``step`` (committed locally) in the background, in place of any older step
        still waiting."""
        with self._lock:
            if self._pending is not None and self._pending < step:
                log.info(
                    "Promotion of local step %d skipped: step %d is ready", self._pending, step
                )
            self._pending = max(step, self._pending or step)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="stepsafe-promoter", daemon=False
                )
                self._thread.start()
            self._lock.notify_all()

    def pinned(self) -> set[int]:
        """The local steps that must stay: waiting for their copy, or being copied."""
        with self._lock:
            return {s for s in (self._pending, self._running) if s is not None}

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._pending is None:
                    self._thread = None
                    self._lock.notify_all()
                    return
                step, self._pending, self._running = self._pending, None, self._pending
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

    def _promote(self, step: int) -> None:
        dst = self.storage.join(self.directory, step_name(step))
        if step in committed_steps(self.storage, self.directory):
            log.info("Step %d is already in the persistent tier; not promoting it again", step)
            return
        t0 = time.perf_counter()
        copied = copy_step(self.local.storage, self.local.step_path(step), self.storage, dst)
        self.promoted.append(step)
        log.info(
            "Promoted local step %d to %s (%.1f MB in %.3f s)",
            step, dst, copied / 1e6, time.perf_counter() - t0,
        )  # fmt: skip
        self.retention()

    def wait(self) -> None:
        """Block until no promotion waits or runs."""
        with self._lock:
            while self._thread is not None:
                self._lock.wait()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._thread is not None
