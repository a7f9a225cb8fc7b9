"""Turn SIGINT, SIGTERM and a wall-clock limit into "save now and stop", on every process.

The handler only sets a flag: the training loop finishes its step, saves at the current step
and exits cleanly, so the save never races the step that is mutating the state. A second
Ctrl+C restores Python's default behaviour (KeyboardInterrupt) for a user who really wants out.

Under several jax.distributed processes a signal (or the time limit) reaches one host, but the
whole job must stop at one step and save it together: a host that goes on training alone waits
forever in the next collective. So the stop is agreed at step boundaries (``check``):

1. The process that wants to stop publishes a flag in the coordinator's key-value store and
   joins an agreement at its current step.
2. Every other process learns of the flag from a background thread that polls the store every
   ``knobs.STOP_POLL_S`` seconds (one small read, ~1 ms here), so a step boundary costs only
   a look at a local variable; at its next boundary it joins the agreement too.
3. The agreement is one exchange of (step, reason) between all processes: they stop at the
   highest step any of them had reached (the others train on to it, which is at most one step
   in a job whose steps are collectives), with the reason of the lowest process that had one.

JAX's own preemption sync point (``multihost_utils.reached_preemption_sync_point``) was not
used: it covers only SIGTERM, not Ctrl+C or the time limit, and it stops working as soon as a
Python handler for SIGTERM is installed, which is how a single process learns of a SIGTERM.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import signal
import threading
import time
from types import FrameType

from stepsafe import knobs
from stepsafe.distributed import CoordinationError, coordinator

log = logging.getLogger("stepsafe")
WALL_CLOCK_LIMIT = "wall-clock limit"  # ``StopRequest.reason`` when the time limit stopped it
_numbers = itertools.count()  # the n-th StopRequest of this process; alike on every process


class StopRequest:
    """Context manager; ``reason`` is None until a signal (its name, e.g. ``"SIGTERM"``) or the
    time limit (``WALL_CLOCK_LIMIT``) asks to stop.

    Inside the ``with`` block SIGINT and SIGTERM only set ``reason`` (on the main thread; on
    another thread no handler is installed and only the time limit applies): the loop checks it
    after each step, saves at the current step and leaves. A second Ctrl+C raises
    ``KeyboardInterrupt`` as usual. The previous handlers come back on exit.

    Under several jax.distributed processes call ``check(step)`` at every step boundary on
    every process instead of reading ``reason``: a signal on any one host then stops every
    process at the same step (see the module's docstring). With one process ``check`` returns
    ``reason`` and costs nothing more.

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
            if stop.check(step, final=step == steps - 1):  # "SIGTERM", "SIGINT", ...
                manager.save(step, state, force=True)
                break
    ```
    """

    def __init__(self, wall_clock_limit_s: float = 0.0) -> None:
        self.deadline = time.monotonic() + wall_clock_limit_s if wall_clock_limit_s > 0 else None
        self._reason: str | None = None
        self._previous: dict[int, object] = {}
        self._agreed: tuple[int, str | None] | None = None  # (step, reason) all processes chose
        self._flag_seen = threading.Event()  # another process asked to stop
        self._closing = threading.Event()
        self._poller: threading.Thread | None = None
        self._key = ""

    @property
    def reason(self) -> str | None:
        """None, or why to stop: a signal's name (``"SIGTERM"``) or ``WALL_CLOCK_LIMIT``.

        This process's own request, until ``check`` has agreed with the other processes; then
        the agreed reason, the same on every process.
        """
        if self._agreed is not None:
            return self._agreed[1]
        if self._reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self._reason = WALL_CLOCK_LIMIT
        return self._reason

    def check(self, step: int, *, final: bool = False) -> str | None:
        """Whether to stop after ``step``: the reason all processes agreed on, or None.

        Call it at every step boundary, on every process, with the same increasing steps.
        With one process it is ``reason``. Under several processes it returns the agreed
        reason at the same step on every process, even those no signal reached.

        Args:
            step (`int`): the step just finished.
            final (`bool`, defaults to `False`): this is the loop's last boundary; the
                processes then always agree once, so that a request arriving during the last
                step cannot leave one process waiting for the others alone.

        Returns:
            `str | None`: e.g. ``"SIGINT"`` or ``WALL_CLOCK_LIMIT``; None: go on.

        Raises:
            CoordinationError: under several processes, another did not join the agreement
                within ``knobs.COORDINATION_TIMEOUT_S``.
        """
        if not self._key:  # one process: nothing to agree on
            return self.reason
        if self._agreed is None:
            mine = self.reason
            if mine is not None:
                self._publish(mine)
            if mine is not None or final or self._flag_seen.is_set():
                self._agree(step, mine)
        if self._agreed is None or step < self._agreed[0]:
            return None
        return self._agreed[1]

    # -- several processes -------------------------------------------------------------------

    def _publish(self, reason: str) -> None:
        c = coordinator()
        try:
            c.set(self._key, json.dumps({"reason": reason, "process": c.index}).encode())
        except CoordinationError:
            if c.try_get(self._key) is None:  # not "already set by another process"
                raise

    def _agree(self, step: int, mine: str | None) -> None:
        c = coordinator()
        docs = [
            json.loads(v)
            for v in c.all_gather(self._key, json.dumps({"step": step, "reason": mine}).encode())
        ]
        self._closing.set()
        at = max(int(d["step"]) for d in docs)
        asked = [(p, d["reason"]) for p, d in enumerate(docs) if d["reason"] is not None]
        self._agreed = (at, asked[0][1] if asked else None)
        if c.index == 0:  # a leftover flag of a finished request would harm nobody
            with contextlib.suppress(CoordinationError):
                c.delete(self._key)
        if asked:
            p, why = asked[0]
            log.warning(
                "%s on process %d of %d: all processes stop after step %d and save it",
                why, p, c.count, at,
            )  # fmt: skip

    def _poll(self) -> None:
        """Background thread: notice another process's flag, without costing the steps."""
        c = coordinator()
        while not self._closing.wait(knobs.STOP_POLL_S):
            if c.try_get(self._key) is not None:
                self._flag_seen.set()
                return

    # -- the with block ----------------------------------------------------------------------

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
        if coordinator().count > 1:
            self._key = f"stop/{next(_numbers)}"
            self._poller = threading.Thread(target=self._poll, name="stepsafe-stop", daemon=True)
            self._poller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        if self._poller is not None:
            self._poller.join(timeout=5 * knobs.STOP_POLL_S + 1)
        for sig, handler in self._previous.items():
            # None: a handler installed outside Python (JAX's preemption notifier catches
            # SIGTERM), which cannot be put back; the default is the honest fallback.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
