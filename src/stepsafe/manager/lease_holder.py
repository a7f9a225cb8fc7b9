"""Who holds a run's lease, and whether that holder still lives (see lease.py).

A lease names its holder: host, boot id, PID namespace, PID and the PID's start time. On this
host, in this PID namespace, those tell a live holder from a dead one, and a reused PID from
its first owner; elsewhere only the renewal time can, after ``knobs.LEASE_TIMEOUT_S``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

from stepsafe import knobs
from stepsafe.storage.temporaries import pid_alive

_held: set[str] = set()  # tokens of the leases that managers of this process hold now
_held_lock = threading.Lock()


def hold(token: str) -> None:
    with _held_lock:
        _held.add(token)


def let_go(token: str) -> None:
    with _held_lock:
        _held.discard(token)


def _forget_in_child() -> None:
    """A forked child holds none of its parent's leases (and a parent's thread may have held
    ``_held_lock`` at the fork)."""
    global _held_lock
    _held_lock = threading.Lock()
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


@lru_cache(maxsize=1)
def _machine() -> tuple[str, str, str]:
    """(host name, boot id, PID namespace): a PID means the same process only when all agree."""
    boot = pidns = ""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    with contextlib.suppress(OSError):
        pidns = os.readlink("/proc/self/ns/pid")
    return socket.gethostname(), boot, pidns


def _start_ticks(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, state letter) of ``pid``; None when there is no
    such process or no /proc to ask. The start time tells a reused PID from its first owner."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        return int(fields[19]), fields[0].decode()
    except (IndexError, ValueError):
        return None


def _own_start() -> int | None:
    info = _start_ticks(os.getpid())
    return info[0] if info else None


def _alive(pid: int, start: int | None) -> bool:
    """Whether process ``pid`` of this machine, started at ``start`` ticks, still runs."""
    info = _start_ticks(pid)
    if info is not None:
        ticks, state = info
        return state not in ("Z", "X") and (start is None or ticks == start)
    return pid_alive(pid)  # no /proc, or not allowed to read it: ask the kernel


@dataclass(frozen=True)
class Holder:
    """What the lease file says, as JSON."""

    host: str
    pid: int
    token: str
    renewed_unix: float
    timeout_s: float = field(default_factory=lambda: knobs.LEASE_TIMEOUT_S)
    boot_id: str = ""
    pid_namespace: str = ""
    start_ticks: int | None = None
    acquired: str = ""  # ISO 8601 with time zone, for people reading the file

    @classmethod
    def this_process(cls) -> Holder:
        host, boot, pidns = _machine()
        now = time.time()
        return cls(
            host, os.getpid(), secrets.token_hex(8), now, knobs.LEASE_TIMEOUT_S, boot, pidns,
            _own_start(), datetime.fromtimestamp(now, UTC).isoformat(),
        )  # fmt: skip

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        """The holder a lease file names; None when it is not a lease we can read."""
        try:
            doc = json.loads(raw)
            return cls(
                str(doc["host"]), int(doc["pid"]), str(doc["token"]), float(doc["renewed_unix"]),
                float(doc.get("timeout_s", knobs.LEASE_TIMEOUT_S)), str(doc.get("boot_id", "")),
                str(doc.get("pid_namespace", "")),
                None if doc.get("start_ticks") is None else int(doc["start_ticks"]),
                str(doc.get("acquired", "")),
            )  # fmt: skip
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def describe(self) -> str:
        host, _, pidns = _machine()
        if self.pid == os.getpid() and self.host == host and self.pid_namespace == pidns:
            return f"another CheckpointManager of this process (pid {self.pid})"
        return f"host {self.host}, pid {self.pid}"

    def unseen_because(self) -> str | None:
        """Why this holder's process cannot be looked at from here (then only its renewals
        tell whether it lives); None when it can."""
        host, _, pidns = _machine()
        if self.host != host:
            return f"it is on host {self.host}"
        if self.pid_namespace != pidns:  # even after a reboot: another machine may share the name
            return (
                f"it is in another PID namespace with host name {host} (another container, or "
                "another machine of that name)"
            )
        return None

    def stale_reason(self, now: float) -> str | None:
        """Why this lease no longer protects a live manager; None when it may."""
        age = now - self.renewed_unix
        if age > self.timeout_s:
            return f"not renewed for {age:.0f} s (timeout {self.timeout_s:.0f} s)"
        if self.unseen_because() is not None:
            return None  # its PIDs are not ours to judge
        host, boot, _ = _machine()
        if self.boot_id and boot and self.boot_id != boot:
            return f"host {host} has restarted since"
        if self.pid == os.getpid() and self.start_ticks == _own_start():
            with _held_lock:
                mine = self.token in _held
            return None if mine else f"left by an earlier manager of this process ({self.pid})"
        if not _alive(self.pid, self.start_ticks):
            return f"process {self.pid} on {host} is gone"
        return None
