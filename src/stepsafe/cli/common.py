"""What every command shares: consoles, number and time formatting, JSON output, errors.

Output goes through rich consoles created per call (so tests capturing ``sys.stdout`` see it);
tables and progress bars degrade to plain text when the output is not a terminal.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from typing import Any

from rich.console import Console

MB = 1_000_000


def out() -> Console:
    """Standard output: results (tables, JSON). ``highlight=False``: no guessing colours."""
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def err() -> Console:
    """Standard error: progress bars and error lines, kept out of piped results."""
    return Console(file=sys.stderr, highlight=False)


def mb(nbytes: int) -> str:
    """Megabytes with two decimals, as seed 003's inspector prints them."""
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
