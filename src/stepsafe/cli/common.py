"""What every command shares: exit codes, consoles, formatting, JSON output, error lines.

Output goes through rich consoles created per call (so tests capturing ``sys.stdout`` see it);
tables and progress bars degrade to plain text when the output is not a terminal.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import errno
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

MB = 1_000_000


class ExitCode(enum.IntEnum):
    """Every status ``stepsafe`` exits with; the table in ``stepsafe.cli.main`` explains each.

    A run stopped by signal N exits ``STOPPED_BY_SIGNAL + N`` (the shell's convention) once its
    checkpoint has committed.
    """

    OK = 0
    NO = 1  # the command's answer is "no": ``diff`` found differences, ``verify`` found damage
    USAGE = 2  # bad arguments or flags (argparse, ConfigError)
    TIME_LIMIT = 3  # ``train`` stopped at wall_clock_limit_seconds, its checkpoint committed
    NOT_FOUND = 4  # no checkpoint or run where the command looked
    DAMAGED = 5  # a checkpoint that is corrupt, incomplete or in an unknown format
    FAILED = 6  # any other stepsafe error
    OS_ERROR = 7  # the operating system refused: disk full, read-only, permissions, links
    STOPPED_BY_SIGNAL = 128


# errno -> (what could not be done, what to do about it)
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("cannot write", "free space on that file system (stepsafe gc RUN --keep N "
                   "deletes old steps) or write to another path"),
    errno.EDQUOT: ("cannot write", "your disk quota is used up: free space or write elsewhere"),
    errno.EFBIG: ("cannot write", "a file outgrew the size limit (ulimit -f) or the file "
                  "system's: raise the limit or write elsewhere"),
    errno.EROFS: ("cannot write", "that file system is mounted read-only: remount it "
                  "read-write or write to another path"),
    errno.EACCES: ("cannot access", "check the owner and permissions of that path"),
    errno.EPERM: ("cannot access", "check the owner and permissions of that path"),
    errno.ELOOP: ("cannot follow", "a symbolic link on that path loops: fix or remove it"),
    errno.ENOTDIR: ("cannot use", "a part of that path is a file where a directory should be: "
                    "check the path"),
    errno.ENOENT: ("cannot find", "check the path"),
}  # fmt: skip


def describe_os_error(e: OSError, where: str | None = None) -> tuple[str, str]:
    """``(message, hint)`` for an OSError: ``"<what> <path>: <strerror>"`` and what to do.

    Args:
        e: the error; its ``filename`` names the path when the failing call knew it.
        where: the path the command was working on, named when ``e`` carries none.
    """
    what, hint = _OS_ERRORS.get(e.errno or 0, ("cannot access", "check the path and retry"))
    path = _text(e.filename) if e.filename is not None else where
    if e.filename2 is not None:
        path = f"{path} -> {_text(e.filename2)}"
    reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e) or type(e).__name__)
    return (f"{what} {path}: {reason}" if path is not None else f"{what}: {reason}"), hint


def _text(name: object) -> str:
    return os.fsdecode(name) if isinstance(name, bytes) else str(name)


def out() -> Console:
    """Standard output: results (tables, JSON). ``highlight=False``: no guessing colours."""
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def err() -> Console:
    """Standard error: progress bars and error lines, kept out of piped results."""
    return Console(file=sys.stderr, highlight=False)


def print_uncut(con: Console, table: Table) -> None:
    """Print ``table`` as wide as its longest cell needs, even past the terminal's width.

    A key path or file name cut to ``params/block_0…`` cannot be acted on; a row longer than
    the terminal is wrapped by the terminal and still copies and greps whole.
    """
    need = Measurement.get(con, con.options.update(max_width=1 << 20), table).maximum
    width = con.width
    con.width = max(width, need)
    try:
        con.print(table)
    finally:
        con.width = width


def mb(nbytes: int) -> str:
    """Megabytes with two decimals, as MaxText's checkpoint inspector prints them."""
    return f"{nbytes / MB:.2f}"


def human_bytes(nbytes: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


def when(nsecs: int | None) -> str:
    """Local time to the second, or "-" when unknown."""
    if nsecs is None:
        return "-"
    return datetime.datetime.fromtimestamp(nsecs / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def iso(nsecs: int | None) -> str | None:
    if nsecs is None:
        return None
    return datetime.datetime.fromtimestamp(nsecs / 1e9, datetime.UTC).isoformat()


def _plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, float) and x != x:
        return "nan"
    return x


def print_json(doc: Any) -> None:
    """Dataclasses, dicts and lists as JSON on stdout (plain ``print``: no rich markup)."""
    print(json.dumps(_plain(doc), indent=2, default=str))


def error(message: str, hint: str | None = None) -> None:
    """One line saying what is wrong, one saying what to do (stderr)."""
    print(f"stepsafe: error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
