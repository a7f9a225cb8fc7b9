"""One writing manager per run: a lease file in the run's checkpoints directory.

Two managers saving into one run race for the same steps and delete each other's checkpoints
through retention. So the first writing ``CheckpointManager`` creates ``<checkpoints>/_LEASE``
(``run_layout.LEASE_FILE``) by a conditional create (local disk: ``O_EXCL``; buckets: the
conditional create that commits a checkpoint), naming its host and process, renews it every
``knobs.LEASE_RENEW_S`` seconds while it lives, and deletes it when closed, garbage-collected
or at interpreter exit. A second manager finds
the lease and is refused with a ``RunInUseError``, unless the lease is stale, so that a crashed
run can always resume:

- its holder was a process of this host (same boot, same PID namespace) that is gone: at once;
- its host has rebooted since: at once;
- it was not renewed for its ``timeout_s`` (``knobs.LEASE_TIMEOUT_S``): at once.

Where the holder's process cannot be looked at from here (another host, or another container
with our host name: another PID namespace), the new manager watches the lease instead of
refusing at once: a live holder rewrites it within ``LEASE_RENEW_S``, and is refused as soon as
that is seen; a lease left unchanged until its ``timeout_s`` has run out (at most
``LEASE_TIMEOUT_S`` of watching) belonged to a run that died, and is taken over with a
warning. So a crashed run restarted in a new container or on another host resumes after at
most the lease's timeout.

Every save first checks (``check``, one small read) that the lease is still this manager's:
not closed, not taken over by another manager, and not used from a forked child (the lease is
its parent's; the renewal thread does not exist in the child).

Limits, said plainly: hosts' clocks must agree to within seconds (the renewal time is the
holder's clock); and taking over a *stale* lease is a read, a delete and a conditional create,
so two managers that take over the same stale lease in the same instant can both succeed: the
one whose lease was replaced finds out at its next save or renewal (``lost``), and its saves
are refused from then on. The lease's name is not a step's, so ``ls`` and ``gc`` pass it by.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from dataclasses import replace

from stepsafe import knobs
from stepsafe.checkpoint.run_layout import LEASE_FILE
from stepsafe.errors import CorruptCheckpointError, RunInUseError, StepsafeError
from stepsafe.manager.lease_holder import Holder, hold, let_go
from stepsafe.storage import Storage

log = logging.getLogger("stepsafe")

_POLL_S = 1.0  # how often a lease whose holder cannot be looked at is read while watched
_MAX_BYTES = 4096  # a lease is a few hundred bytes; never read more
_TRIES = 5


# -- the file, on local disk or in a bucket --------------------------------------------------


class _LeaseFile:
    """The lease file through the run's storage: one conditional create decides who holds it."""

    def __init__(self, storage: Storage, path: str) -> None:
        self.storage, self.path = storage, path

    def create(self, data: bytes) -> bool:
        try:
            self.storage.create_exclusive(self.path, data)
        except FileExistsError:
            return False
        return True

    def read(self) -> bytes | None:
        """The file's bytes; None when there is none. Never blocks on a FIFO, follows a link
        or reads more than a lease holds (the storage's bounded, regular-file-only reads)."""
        try:
            return self.storage.read_bytes(self.path, _MAX_BYTES)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, CorruptCheckpointError) as e:  # a link, FIFO, device, too big...
            raise RunInUseError(
                f"{self.path} cannot be read as a lease stepsafe wrote ({e}): remove it if no "
                "run uses this directory"
            ) from e

    def replace(self, data: bytes) -> None:
        self.storage.put_whole(self.path, data)

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.storage.delete_file(self.path)


# -- the lease -------------------------------------------------------------------------------


class Lease:
    """This process's hold on one run directory; ``acquire`` it, ``release`` it once."""

    def __init__(self, file: _LeaseFile, directory: str, holder: Holder) -> None:
        self._file = file
        self.directory = directory
        self.holder = holder
        self.lost: str | None = None  # why this manager no longer holds the lease
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._released = False
        self._thread = threading.Thread(
            target=self._renew_loop, name="stepsafe-lease", daemon=True
        )  # daemon: it must never keep the interpreter alive; release stops it

    @property
    def path(self) -> str:
        return self._file.path

    @classmethod
    def acquire(cls, storage: Storage, directory: str) -> Lease:
        """Take the lease of ``directory`` (a run's checkpoints directory).

        Blocks while it watches a lease whose holder cannot be looked at from here (another
        host or PID namespace): until that holder renews it (refused) or its timeout runs out
        (taken over), at most ``knobs.LEASE_TIMEOUT_S``.

        Raises:
            RunInUseError: a live manager (of this or another process) holds it, or a file
                stepsafe did not write has its name (it is left alone).
            StepsafeError: the lease cannot be written (a read-only or missing run directory).
        """
        path = storage.join(directory, LEASE_FILE)
        file = _LeaseFile(storage, path)
        me = Holder.this_process()
        for attempt in range(_TRIES):
            try:
                created = file.create(me.to_json())
            except OSError as e:
                raise StepsafeError(
                    f"{directory}: cannot write its lease {path} ({e}): a manager that saves "
                    "needs a writable run directory; to only read checkpoints, use "
                    "ManagerOptions(enable_checkpointing=False)"
                ) from e
            if created:
                break
            raw = file.read()
            if raw is None:
                continue  # released between our create and our read
            holder = Holder.parse(raw)
            if holder is None and raw.strip():
                raise RunInUseError(
                    f"{path} is not a lease stepsafe wrote, so it is left alone: remove it if "
                    f"no run uses {directory}"
                )
            if holder is None:  # empty: being written right now, or its writer died first
                if attempt < _TRIES - 2:
                    time.sleep(0.2)
                    continue
                log.warning("Replacing the empty lease %s", path)
            else:
                reason = holder.stale_reason(time.time())
                unseen = holder.unseen_because()
                if reason is None and unseen is not None:
                    latest, reason = _watch(file, raw, holder, unseen)
                    if latest != raw:  # rewritten (by a live holder) or released
                        renewed = Holder.parse(latest) if latest is not None else None
                        if renewed is not None:
                            raise RunInUseError(_in_use_message(directory, path, renewed))
                        continue  # gone, or not a lease any more: judge it afresh
                if reason is None:
                    raise RunInUseError(_in_use_message(directory, path, holder))
                log.warning(
                    "Taking over the lease of %s from %s: %s", directory, holder.describe(), reason
                )
            file.delete()
        else:
            raise RunInUseError(
                f"{directory}: could not take its lease {path} after {_TRIES} tries (another "
                "manager is starting on it at the same time?): run one manager per run directory"
            )
        lease = cls(file, directory, me)
        hold(me.token)
        lease._thread.start()
        return lease

    def check(self) -> None:
        """Raise unless this manager may save now: the lease is still ours (re-read: one small
        read), it was not released, and this is the process that took it.

        Raises:
            RunInUseError: saving on would race another manager, or write without a lease.
        """
        if os.getpid() != self.holder.pid:  # before any lock: one may be held since the fork
            raise RunInUseError(
                f"{self.directory}: this CheckpointManager was made by process {self.holder.pid} "
                f"and this is its forked child {os.getpid()}: the run's lease {self.path} is the "
                "parent's, so the child does not save; save from the parent, or give the child "
                "a run directory and manager of its own"
            )
        with self._lock:
            if self._released:
                raise RunInUseError(
                    f"{self.directory}: this CheckpointManager was closed and released the run's "
                    f"lease {self.path}, so it no longer saves (another manager may hold the run "
                    "now): make a new CheckpointManager to save again"
                )
            if self.lost is None:
                self._confirm(rewrite=False)
        if self.lost is not None:
            raise RunInUseError(
                f"{self.directory}: {self.lost}; this manager no longer saves there, so that "
                "two runs do not overwrite and delete each other's checkpoints"
            )

    def _confirm(self, rewrite: bool) -> bool:
        """Under ``_lock``: re-read the lease; set ``lost`` when another holds it. True when it
        is ours as written. A lease deleted by hand is written again if ``rewrite`` (a renewal;
        a save leaves that to it, and its own failure to a run directory that is gone)."""
        raw = self._file.read()
        if raw is None and not rewrite:
            return False
        if raw is None:  # deleted by hand: take it again, unless someone else just did
            fresh = replace(self.holder, renewed_unix=time.time())
            if self._file.create(fresh.to_json()):
                self.holder = fresh
                return False
            raw = self._file.read() or b""
        holder = Holder.parse(raw)
        if holder is None or holder.token != self.holder.token:
            who = holder.describe() if holder else "something unreadable"
            self.lost = f"its lease {self.path} was taken over by {who}"
            log.error("%s: %s", self.directory, self.lost)
            return False
        return True

    def renew(self) -> None:
        """Write a fresh renewal time, after checking the lease is still ours."""
        with self._lock:
            if self._released or self.lost is not None or not self._confirm(rewrite=True):
                return
            self.holder = replace(self.holder, renewed_unix=time.time())
            self._file.replace(self.holder.to_json())

    def _renew_loop(self) -> None:
        while not self._stop.wait(knobs.LEASE_RENEW_S) and self.lost is None:
            try:
                self.renew()
            except Exception as e:  # a storage hiccup: the next renewal tries again
                log.warning("Could not renew the lease %s: %s", self.path, e)

    def release(self) -> None:
        """Delete the lease if it is still ours; idempotent, never raises."""
        if os.getpid() != self.holder.pid:
            return  # a forked child: the lease is its parent's (and _lock may be held forever)
        with self._lock:
            if self._released:
                return
            self._released = True
            self._stop.set()
            let_go(self.holder.token)
            try:
                raw = self._file.read()
                holder = Holder.parse(raw) if raw else None
                if holder is not None and holder.token == self.holder.token:
                    self._file.delete()
            except Exception as e:  # the directory may be gone; the lease then goes stale
                log.warning("Could not release the lease %s: %s", self.path, e)


def _watch(file: _LeaseFile, raw: bytes, holder: Holder, unseen: str) -> tuple[bytes | None, str]:
    """Read the lease until it changes or its holder's timeout has run out, whichever is first.

    Only a renewal tells whether a holder we cannot look at lives: it rewrites the file every
    ``LEASE_RENEW_S``, well within its timeout. Returns the lease's last bytes (None: it was
    deleted) and why it is stale, which counts only when those bytes are still ``raw``. Waits
    at most ``LEASE_TIMEOUT_S`` (however long a timeout the file claims) and never longer than
    the timeout.
    """
    start = time.monotonic()
    most = knobs.LEASE_TIMEOUT_S
    left = holder.renewed_unix + holder.timeout_s - time.time()
    wait = min(left, holder.timeout_s, most) if math.isfinite(left) else most
    wait = max(0.0, min(wait, most))
    log.warning(
        "%s holds the lease %s, and whether it still runs cannot be seen from here (%s): "
        "watching for up to %.0f s whether it renews it",
        holder.describe(), file.path, unseen, wait,
    )  # fmt: skip
    latest: bytes | None = raw
    while latest == raw and (waited := time.monotonic() - start) < wait:
        time.sleep(min(_POLL_S, wait - waited))
        latest = file.read()
    waited = time.monotonic() - start
    return latest, (
        f"waited {waited:.0f} s and it was not renewed (its timeout is {holder.timeout_s:.0f} s; "
        f"{unseen}, so its process cannot be looked at)"
    )


def _in_use_message(directory: str, path: str, holder: Holder) -> str:
    age = max(0.0, time.time() - holder.renewed_unix)
    left = max(0.0, holder.timeout_s - age)
    return (
        f"{directory} is in use by {holder.describe()} (lease {path}, renewed {age:.0f} s ago): "
        "two managers saving into one run would delete each other's checkpoints; stop the "
        f"other one or use another run directory (if it died, its lease expires in {left:.0f} "
        "s; to only read checkpoints, use ManagerOptions(enable_checkpointing=False))"
    )
