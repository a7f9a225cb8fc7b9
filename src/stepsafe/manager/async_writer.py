"""One background save at a time, whose failure is never swallowed.

The caller hands over a job (a function that writes an already-captured snapshot); the writer
runs it on a non-daemon thread, so the interpreter waits for an in-flight save before exiting.
A failure is kept and raised to the caller at the next ``submit`` or ``wait``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from stepsafe.errors import StepsafeError


class BackgroundSaveError(StepsafeError):
    """A background save failed; the checkpoint it was writing was not committed."""


class AsyncWriter:
    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""

    def submit(self, what: str, job: Callable[[], None]) -> None:
        """Wait for the previous job (raising its failure), then start ``job``."""
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as e:  # kept for the caller, who is on another thread
                self._error = e

        self._what = what
        self._thread = threading.Thread(target=run, name=f"stepsafe-{what}", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until no job runs; raise the last job's failure, once."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise BackgroundSaveError(f"background save of {self._what} failed: {error}") from error

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
