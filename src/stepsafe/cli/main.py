"""The ``stepsafe`` command: a thin face over library calls a Python user can make too.

One module per command under ``stepsafe.cli`` (``HELP``, ``EXAMPLE``, ``HINT``,
``add_arguments``, ``run``). Expected failures (``StepsafeError``) print one line and a hint
and exit 1; usage errors exit 2; no traceback for either.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from stepsafe.cli import common
from stepsafe.cli import diff as diff_cmd
from stepsafe.cli import gc as gc_cmd
from stepsafe.cli import inspect as inspect_cmd
from stepsafe.cli import ls as ls_cmd
from stepsafe.cli import train as train_cmd
from stepsafe.cli import verify as verify_cmd
from stepsafe.errors import ConfigError, StepsafeError

COMMANDS: dict[str, ModuleType] = {
    "ls": ls_cmd,
    "inspect": inspect_cmd,
    "verify": verify_cmd,
    "gc": gc_cmd,
    "diff": diff_cmd,
    "train": train_cmd,
}
USAGE_ERROR = 2
FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepsafe",
        description="Fast, atomic, verified checkpoints: list, inspect, verify, clean, compare.",
        epilog="example: stepsafe ls outputs   (stepsafe COMMAND --help for each command)",
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
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, argparse printed why)
        return e.code if isinstance(e.code, int) else USAGE_ERROR
    module = args.module
    try:
        return module.run(args)
    except ConfigError as e:
        common.error(f"configuration error: {e}", module.HINT)
        return USAGE_ERROR
    except StepsafeError as e:
        common.error(str(e), module.HINT)
        return FAILURE
    except KeyboardInterrupt:
        common.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
