"""The ``stepsafe`` command: a thin face over library calls a Python user can make too.

Expected failures print one line and a hint, exit 1 (2 for usage errors), no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from stepsafe.errors import ConfigError, StepsafeError

EXAMPLES = {
    "train": "stepsafe train --config examples/configs/demo.yml steps=300 run_name=try1",
}


def _train(args: argparse.Namespace) -> int:
    from stepsafe.config import load_config

    config = load_config(args.config, args.overrides)
    from stepsafe.demo.train import train  # imports JAX: only for this command

    result = train(config, progress=not args.no_progress and sys.stderr.isatty())
    how = f"stopped by {result.stopped_by}" if result.stopped_by else "finished"
    print(f"{how} at step {result.end_step} (started at {result.start_step}, {result.source})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepsafe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "train",
        help="run the demo trainer (resumes this run's latest checkpoint if there is one)",
        epilog=f"example: {EXAMPLES['train']}",
    )
    p.add_argument("--config", help="YAML file of flags (MaxText names)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="flag overrides")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a bar")
    p.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return args.run(args)
    except ConfigError as e:
        print(f"stepsafe: configuration error: {e}", file=sys.stderr)
        return 2
    except StepsafeError as e:
        print(f"stepsafe: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
