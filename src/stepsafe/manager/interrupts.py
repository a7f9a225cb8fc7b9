"""Turn SIGINT, SIGTERM and a wall-clock limit into "save now and stop", on every process.

The handler only sets a flag: the training loop finishes its step, saves at the current step
and exits cleanly, so the save never races the step that is mutating the state. A second
Ctrl+C restores Python's default behaviour (KeyboardInterrupt) for a user who really wants out.

Under several jax.distributed processes a signal (or the time limit) reaches one host, but the
whole job must stop at one step and save it together: a host that goes on training alone waits
forever in the next collective. The stop is agreed at step boundaries (``check``) without ever
making a process wait at a boundary that a peer stuck inside the next step (a collective that
needs this process) cannot reach:

1. The process that wants to stop sets a flag in the coordinator's key-value store and posts
   its current step: it will not pass this boundary before the stop step is known.
2. Every other process learns of the flag from a background thread that polls the store every
   ``knobs.STOP_POLL_S`` seconds (one small read, ~1 ms here), so a step boundary costs only a
   look at local variables. The thread posts the first step its main thread has not yet passed,
   even while that thread is stuck in a collective; the main thread will not pass it either.
3. Once every process has posted, the stop step is the highest step posted: no process has
   passed it, and every process trains on to it (at most one step in a job whose steps are
   collectives), saves it and stops, with the reason of the lowest process that had one.

JAX's own preemption sync point (``multihost_utils.reached_preemption_sync_point``) was not
used: it covers only SIGTERM, not Ctrl+C or the time limit, and it stops working as soon as a
Python handler for SIGTERM is installed, which is how a single process learns of a SIGTERM.
"""

from __future__ import annotations

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
        self._agreement: _Agreement | None = None  # under several processes

    @property
    def reason(self) -> str | None:
        """None, or why to stop: a signal's name (``"SIGTERM"``) or ``WALL_CLOCK_LIMIT``.

        This process's own request, until ``check`` has agreed with the other processes; then
        the agreed reason, the same on every process.
        """
        if self._agreement is not None and self._agreement.decided is not None:
            return self._agreement.decided[1]
        return self._own()

    def _own(self) -> str | None:
        if self._reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self._reason = WALL_CLOCK_LIMIT
        return self._reason

    def check(self, step: int, *, final: bool = False) -> str | None:
        """Whether to stop after ``step``: the reason all processes agreed on, or None.

        Call it at every step boundary, on every process, with the same increasing steps.
        With one process it is ``reason``. Under several processes it returns the agreed
        reason at the same step on every process, even those no signal reached; until a stop
        is asked it costs no exchange at all.

        Args:
            step (`int`): the step just finished.
            final (`bool`, defaults to `False`): this is the loop's last boundary; the
                processes then always agree once, so that a request arriving during the last
                step cannot leave one process waiting for the others alone.

        Returns:
            `str | None`: e.g. ``"SIGINT"`` or ``WALL_CLOCK_LIMIT``; None: go on.

        Raises:
            CoordinationError: under several processes, another did not post its step within
                ``knobs.COORDINATION_TIMEOUT_S``.
        """
        if self._agreement is None:  # one process: nothing to agree on
            return self.reason
        return self._agreement.check(step, self._own(), final)

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
            self._agreement = _Agreement(f"stop/{next(_numbers)}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._agreement is not None:
            self._agreement.close()
        for sig, handler in self._previous.items():
            # None: a handler installed outside Python (JAX's preemption notifier catches
            # SIGTERM), which cannot be put back; the default is the honest fallback.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


class _Agreement:
    """One stop, agreed between the processes of a job (steps 1-3 of the module docstring).

    Keys under ``stop/<n>/``: ``asked`` (the flag) and ``p<i>``, process i's post: the first
    step it has not passed and will not pass before the stop step is known, and its own reason.
    """

    def __init__(self, key: str) -> None:
        self.key, self.c = key, coordinator()
        self.decided: tuple[int, str | None] | None = None  # (stop step, reason)
        self._passed: int | None = None  # the last step whose check said "go on"
        self._posted = False
        self._error: CoordinationError | None = None
        self._lock = threading.Lock()
        self._known = threading.Event()  # ``decided`` or ``_error`` is set
        self._closing = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="stepsafe-stop", daemon=True)
        self._poller.start()

    def check(self, step: int, mine: str | None, final: bool) -> str | None:
        with self._lock:
            gather = not self._posted and (mine is not None or final)
            if gather:  # this process asks (or the loop ends): it stops here at the earliest
                if mine is not None:
                    self._set_flag(mine)
                self._post(step, mine)
            elif not self._posted:
                self._passed = step
                return None
        if gather:
            self._gather()
        elif not self._known.wait(knobs.COORDINATION_TIMEOUT_S):
            raise CoordinationError(
                f"stop request {self.key!r}: no agreement on the stop step within "
                f"{knobs.COORDINATION_TIMEOUT_S:g} s on process {self.c.index} of {self.c.count}"
            )
        if self._error is not None:
            raise self._error
        assert self.decided is not None
        at, reason = self.decided
        return reason if step >= at else None

    def close(self) -> None:
        self._closing.set()
        self._poller.join(timeout=5 * knobs.STOP_POLL_S + 1)

    def _set_flag(self, reason: str) -> None:
        flag = f"{self.key}/asked"
        try:
            self.c.set(flag, json.dumps({"reason": reason, "process": self.c.index}).encode())
        except CoordinationError:
            if self.c.try_get(flag) is None:  # not "already set by another process"
                raise

    def _post(self, first_open: int, mine: str | None) -> None:
        doc = {"step": first_open, "reason": mine}
        self.c.set(f"{self.key}/p{self.c.index}", json.dumps(doc).encode())
        self._posted = True

    def _gather(self) -> None:
        """Read every process's post; the stop step is the highest one."""
        try:
            docs = [json.loads(self.c.get(f"{self.key}/p{p}")) for p in range(self.c.count)]
        except CoordinationError as e:
            self._error = e
            self._known.set()
            return
        asked = [(p, d["reason"]) for p, d in enumerate(docs) if d["reason"] is not None]
        at = max(int(d["step"]) for d in docs)
        self.decided = (at, asked[0][1] if asked else None)
        self._known.set()
        if asked:
            p, why = asked[0]
            log.warning(
                "%s on process %d of %d: all processes stop at step %d and save it",
                why, p, self.c.count, at,
            )  # fmt: skip

    def _poll(self) -> None:
        """Background thread: notice another process's flag without costing the steps, and
        answer it even while the main thread is stuck in a step that waits for the asker."""
        flag = f"{self.key}/asked"
        while not self._closing.wait(knobs.STOP_POLL_S):
            if self._posted:
                return  # the main thread posted: it gathers
            if self.c.try_get(flag) is None:
                continue
            with self._lock:
                if self._posted:
                    return
                try:
                    self._post(_NONE_PASSED if self._passed is None else self._passed + 1, None)
                except CoordinationError as e:
                    self._error = e
                    self._known.set()
                    return
            self._gather()
            return


_NONE_PASSED = -(2**62)  # a post before the first boundary: any step is at or after it
