"""``stepsafe train``: the demo trainer (resumes this run's latest checkpoint if there is one)."""

from __future__ import annotations

import argparse
import logging
import sys

HELP = "run the demo trainer (resumes this run's latest checkpoint if there is one)"
EXAMPLE = "stepsafe train --config examples/configs/demo.yml steps=300 run_name=try1"
HINT = "flags are MaxText's names as key=value; see examples/configs/demo.yml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of flags (MaxText names)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="flag overrides")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a bar")


def run(args: argparse.Namespace) -> int:
    from stepsafe.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = load_config(args.config, args.overrides)
    from stepsafe.demo.train import train  # imports JAX: only for this command

    result = train(config, progress=not args.no_progress and sys.stderr.isatty())
    how = f"stopped by {result.stopped_by}" if result.stopped_by else "finished"
    print(f"{how} at step {result.end_step} (started at {result.start_step}, {result.source})")
    return 0
