"""The temporaries of local saves: how they are named, whose they are, when they are stale.

A local transaction writes into ``<parent>/<name>.stepsafe-tmp-<host>-<pid>-<random>`` and
renames it to ``<name>`` on commit (local.py). What a save that died leaves is such a temporary,
and its name says which process wrote it: one of this host whose process is gone can never
finish, so it is stale at once; one of another host only once it is old. ``LocalStorage`` answers
the storage hooks (``Storage.temporary_target``, ``writer_alive``, ``stale_entries``) from here.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time

TMP_MARK = ".stepsafe-tmp-"


def temporary_name(name: str) -> str:
    """A fresh temporary's name for a save of ``name``, naming this host and process."""
    return f"{name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def temporary_target(name: str) -> str | None:
    """The name that the temporary ``name`` takes on commit; None when ``name`` is no
    temporary's (``"300.stepsafe-tmp-h-1-ab"`` -> ``"300"``; ``"300"`` -> None)."""
    return name.split(TMP_MARK, 1)[0] if is_temporary(name) else None


def is_temporary(name: str) -> bool:
    return TMP_MARK in name


def temporary_writer(name: str) -> tuple[str, int | None]:
    """(host, pid) of the process that made the temporary ``name``
    (``<name>.stepsafe-tmp-<host>-<pid>-<random>``); pid None when the name holds none."""
    host, _, pid = name.split(TMP_MARK, 1)[1].rpartition("-")[0].rpartition("-")
    return host, int(pid) if pid.isascii() and pid.isdigit() else None


def writer_alive_here(name: str) -> bool | None:
    """Whether the process that made the temporary ``name`` is alive; None when it ran on
    another host (or ``name`` says nothing: no temporary's, or no PID in it), where this host
    cannot tell."""
    if not is_temporary(name):
        return None
    host, pid = temporary_writer(name)
    if host != socket.gethostname() or pid is None:
        return None
    return pid_alive(pid)


def stale_temporaries(directory: str, *, min_age_s: float = 0.0) -> list[str]:
    """Temporaries under ``directory`` left by saves that can no longer finish.

    One written on this host by a process that is gone is stale at once; any other only once
    it is older than ``min_age_s`` (another host's save may still be running).
    """
    now = time.time()
    out = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if not is_temporary(name):
            continue
        path = os.path.join(directory, name)
        dead_here = writer_alive_here(name) is False
        try:
            old = now - os.stat(path).st_mtime >= min_age_s
        except FileNotFoundError:
            continue
        if dead_here or (old and min_age_s > 0):
            out.append(path)
    return out


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str, *, min_age_s: float = 0.0) -> list[str]:
    """Delete what ``stale_temporaries`` finds; returns the removed paths."""
    removed = stale_temporaries(directory, min_age_s=min_age_s)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
