"""One background save at a time, whose failure is never swallowed.

The caller hands over a job (a function that writes an already-captured snapshot); the writer
runs it on a non-daemon thread, so the interpreter waits for an in-flight save before exiting.
A failure is kept and raised to the caller at the next ``submit`` or ``wait``; one that nobody
will collect, because the process is exiting, is logged.

Two details of CPython decide whether a save survives its process's end:

- ``wait`` blocks on an event the job sets when it is over, never on ``Thread.join`` of a
  running thread: before Python 3.13, a ``join`` interrupted by an exception from a signal
  handler (Ctrl+C's ``KeyboardInterrupt``) marks the thread as finished while it still runs
  (bpo-45274's clean-up), after which every ``join`` returns at once and the interpreter exits
  without waiting for it: the save would be cut off, silently.
- At exit, the interpreter shuts thread pools down (``concurrent.futures`` refuses new work)
  before it joins non-daemon threads, and a save still running needs the I/O pool to commit.
  So the writer waits for its jobs in a hook registered after ``concurrent.futures``' own, which
  runs first (hooks run in reverse order).
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401  (its exit hook must be registered before ours)
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from stepsafe.errors import BackgroundSaveError

log = logging.getLogger("stepsafe")


class AsyncWriter:
    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._what = ""
        _writers.add(self)

    def submit(self, what: str, job: Callable[[], None]) -> None:
        """Wait for the previous job (raising its failure), then start ``job``."""
        self.wait()
        done = threading.Event()

        def run() -> None:
            try:
                job()
            except BaseException as e:  # kept for the caller, who is on another thread
                self._error = e
            finally:
                done.set()

        self._what = what
        self._done = done
        self._thread = threading.Thread(target=run, name=f"stepsafe-{what}", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until no job runs; raise the last job's failure, once.

        Interrupted (``KeyboardInterrupt``, or any exception raised while it blocks), it keeps
        the job: the next ``wait`` waits for it again, and the interpreter still waits for it
        at exit.
        """
        if self._thread is not None:
            self._done.wait()
            self._thread.join()  # the job is over: only the thread's own exit is left
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise BackgroundSaveError(f"background save of {self._what} failed: {error}") from error

    @property
    def busy(self) -> bool:
        """True while a job runs (its result not yet collected by ``wait`` does not count)."""
        return self._thread is not None and not self._done.is_set()

    def _finish_at_exit(self) -> None:
        try:
            self.wait()
        except BackgroundSaveError as e:
            log.error("%s (reported at exit: nobody waited for it)", e)


_writers: weakref.WeakSet[AsyncWriter] = weakref.WeakSet()
_after_writers: weakref.WeakSet[Any] = weakref.WeakSet()


def finish_after_writers_at_exit(worker: Any) -> None:
    """Have the interpreter's exit wait for ``worker`` (its ``_finish_at_exit()``) after every
    writer's save, before the thread pools shut down: a background job that a save's commit
    hands work to (multi-tier promotion) must finish with the pools it needs."""
    _after_writers.add(worker)


def _finish_all_at_exit() -> None:
    for writer in list(_writers):
        writer._finish_at_exit()
    for worker in list(_after_writers):
        worker._finish_at_exit()


_register = getattr(threading, "_register_atexit", None)  # CPython >= 3.9
if _register is not None:
    _register(_finish_all_at_exit)
