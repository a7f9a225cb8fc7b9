"""Turn SIGINT, SIGTERM and a wall-clock limit into "save now and stop".

The handler only sets a flag: the training loop finishes its step, saves at the current step
and exits cleanly, so the save never races the step that is mutating the state. A second
Ctrl+C restores Python's default behaviour (KeyboardInterrupt) for a user who really wants out.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

log = logging.getLogger("stepsafe")
WALL_CLOCK_LIMIT = "wall-clock limit"  # ``StopRequest.reason`` when the time limit stopped it


class StopRequest:
    """Context manager; ``reason`` is None until a signal (its name, e.g. ``"SIGTERM"``) or the
    time limit (``WALL_CLOCK_LIMIT``) asks to stop.

    Inside the ``with`` block SIGINT and SIGTERM only set ``reason`` (on the main thread; on
    another thread no handler is installed and only the time limit applies): the loop checks it
    after each step, saves at the current step and leaves. A second Ctrl+C raises
    ``KeyboardInterrupt`` as usual. The previous handlers come back on exit.

    Args:
        wall_clock_limit_s (`float`, defaults to `0.0`): ask to stop this many seconds after
            the ``StopRequest`` is made (``stepsafe train``'s flag ``wall_clock_limit_seconds``);
            0 or less: no time limit.

    Example:

    ```python
    from stepsafe import CheckpointManager, StopRequest

    with StopRequest(wall_clock_limit_s=3600) as stop, CheckpointManager(directory) as manager:
        for step in range(start, steps):
            state = train_step(state)
            manager.save(step, state)
            if stop.reason:  # "SIGTERM", "SIGINT" or "wall-clock limit"
                manager.save(step, state, force=True)
                break
    ```
    """

    def __init__(self, wall_clock_limit_s: float = 0.0) -> None:
        self.deadline = time.monotonic() + wall_clock_limit_s if wall_clock_limit_s > 0 else None
        self._reason: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def reason(self) -> str | None:
        """None, or why to stop: a signal's name (``"SIGTERM"``) or ``WALL_CLOCK_LIMIT``."""
        if self._reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self._reason = WALL_CLOCK_LIMIT
        return self._reason

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._reason is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._reason = name
        log.warning("%s received: saving a checkpoint at the current step, then stopping", name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
