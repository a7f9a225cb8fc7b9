"""The ``stepsafe`` command: a thin face over library calls a Python user can make too.

One module per command under ``stepsafe.cli`` (``HELP``, ``EXAMPLE``, ``HINT``,
``add_arguments``, ``run``). Every failure prints one line (``stepsafe: error: ...`` naming
the path) and a hint, never a traceback, and exits with a status saying which kind it was
(``stepsafe.cli.common.ExitCode``; the README's "Command line" repeats this table):

code   meaning
-----  -------------------------------------------------------------------------------------
0      success: train finished; diff: no differences; verify: every checksum matches
1      the answer is no (as for diff(1)): diff found differences, verify found damage
2      usage: bad arguments, unknown or conflicting flags
3      train stopped at wall_clock_limit_seconds after its checkpoint committed: run
       the same command again to continue. Not 124, which timeout(1) returns when it
       killed a command (that may have saved nothing), nor 128+N, which is for signals
4      not found: no checkpoint or run at the path given
5      a checkpoint that is corrupt, incomplete (never committed) or in an unknown format
6      any other stepsafe error
7      the operating system refused: disk full, read-only, permission denied, a symlink loop
128+N  train stopped by signal N (130: SIGINT/Ctrl+C, 143: SIGTERM) after its checkpoint
       committed. A second Ctrl+C abandons that save, and Ctrl+C stops any other command: both
       also exit 130 (resuming is safe either way: it starts from the latest committed step)
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import ModuleType

from stepsafe.cli import common
from stepsafe.cli import convert as convert_cmd
from stepsafe.cli import diff as diff_cmd
from stepsafe.cli import gc as gc_cmd
from stepsafe.cli import inspect as inspect_cmd
from stepsafe.cli import ls as ls_cmd
from stepsafe.cli import train as train_cmd
from stepsafe.cli import verify as verify_cmd
from stepsafe.cli.common import ExitCode
from stepsafe.errors import (
    BackgroundSaveError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    CredentialsError,
    IncompleteCheckpointError,
    RunInUseError,
    StepsafeError,
    UnsupportedFormatError,
)

EXIT_STATUS_TABLE = __doc__[__doc__.index("code   meaning") :]
COMMANDS: dict[str, ModuleType] = {
    "ls": ls_cmd,
    "inspect": inspect_cmd,
    "verify": verify_cmd,
    "gc": gc_cmd,
    "diff": diff_cmd,
    "convert": convert_cmd,
    "train": train_cmd,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepsafe",
        description="Fast, atomic, verified checkpoints: list, inspect, verify, clean, compare, "
        "convert.",
        epilog="example: stepsafe ls outputs   (stepsafe COMMAND --help for each command)\n\n"
        f"exit status:\n{EXIT_STATUS_TABLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=(module.__doc__ or module.HELP).strip(),
            epilog=f"example:\n  {module.EXAMPLE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (see the table above)."""
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, argparse printed why)
        return e.code if isinstance(e.code, int) else ExitCode.USAGE
    module = args.module
    try:
        return module.run(args)
    except ConfigError as e:
        common.error(f"configuration error: {e}", module.HINT)
        return ExitCode.USAGE
    except StepsafeError as e:
        code, cause = _code_of(e), _os_cause(e)
        if cause is not None and code == ExitCode.FAILED:
            return _os_error(cause, args, str(e))  # the disk failed (full, read-only...)
        saving = isinstance(e, BackgroundSaveError)  # not the flags' fault: no hint about them
        hint = "earlier committed checkpoints are intact" if saving else module.HINT
        says_what = isinstance(e, CredentialsError | RunInUseError)  # what to do is in it
        common.error(str(e), None if says_what else hint)
        return code
    except OSError as e:
        return _os_error(e, args)
    except KeyboardInterrupt:
        common.error("interrupted")
        return ExitCode.STOPPED_BY_SIGNAL + signal.SIGINT


def _code_of(e: StepsafeError) -> ExitCode:
    if isinstance(e, CheckpointNotFoundError):
        return ExitCode.NOT_FOUND
    if isinstance(e, CorruptCheckpointError | IncompleteCheckpointError | UnsupportedFormatError):
        return ExitCode.DAMAGED
    return ExitCode.FAILED


def _os_cause(e: BaseException) -> OSError | None:
    """The OSError a stepsafe error was raised from, if any (e.g. a background save's)."""
    while e.__cause__ is not None:
        e = e.__cause__
        if isinstance(e, OSError):
            return e
    return None


def _os_error(e: OSError, args: argparse.Namespace, wrapped: str = "") -> ExitCode:
    """One line: ``<what> <path>: <strerror>`` (the command's path when the failing call named
    none), after the context of the stepsafe error that ``wrapped`` it; a hint for that errno."""
    given = (getattr(args, name, None) for name in ("path", "run_dir", "base"))
    message, hint = common.describe_os_error(e, next((str(g) for g in given if g), None))
    if wrapped:
        context = wrapped.removesuffix(f": {e}")
        message = f"{context}: {message}" if context != wrapped else wrapped
    common.error(message, hint)
    return ExitCode.OS_ERROR


if __name__ == "__main__":
    sys.exit(main())
