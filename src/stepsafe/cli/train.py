"""``stepsafe train``: the demo trainer (resumes this run's latest checkpoint if there is one).

Exit status: 0 only when the run finished; 3 when it stopped at ``wall_clock_limit_seconds``
and 128+N when signal N stopped it (130 Ctrl+C, 143 SIGTERM), both after the checkpoint at the
current step committed, so a scheduler can tell a finished run from one to resubmit.

Under jax.distributed (``jax_coordinator_address``, ``jax_num_processes``, ``jax_process_id``;
``scripts/demo-multihost`` starts such a job on one machine) every process runs this command;
a stop asked on any one of them stops all at the same step, so all exit with the same status.
"""

from __future__ import annotations

import argparse
import logging
import signal

from rich.console import Console

from stepsafe.cli import common
from stepsafe.cli.common import ExitCode

HELP = "run the demo trainer (resumes this run's latest checkpoint if there is one)"
EXAMPLE = "stepsafe train --config examples/configs/demo.yml steps=300 run_name=try1"
HINT = "flags are MaxText's names as key=value; see examples/configs/demo.yml"
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of flags (MaxText names)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="flag overrides")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a bar")


def run(args: argparse.Namespace) -> int:
    from stepsafe.config import load_config
    from stepsafe.manager import run_checkpoint_dir

    console = common.err()
    bar = console if console.is_terminal and not args.no_progress else None
    _log_to(bar)
    config = load_config(args.config, args.overrides)
    args.path = run_checkpoint_dir(config.base_output_directory, config.run_name)  # for errors
    from stepsafe.demo.train import train  # imports JAX: only for this command

    result = train(config, console=bar)
    how = f"stopped by {result.stopped_by}" if result.stopped_by else "finished"
    print(f"{how} at step {result.end_step} (started at {result.start_step}, {result.source})")
    return exit_code(result.stopped_by)


def exit_code(stopped_by: str | None) -> int:
    """0 for a finished run; what stopped it otherwise (see ``stepsafe.cli.main``).

    Args:
        stopped_by: ``StopRequest.reason``: None, a signal's name or the wall-clock limit.
    """
    from stepsafe.manager.interrupts import WALL_CLOCK_LIMIT

    if stopped_by is None:
        return ExitCode.OK
    if stopped_by == WALL_CLOCK_LIMIT:
        return ExitCode.TIME_LIMIT
    return ExitCode.STOPPED_BY_SIGNAL + signal.Signals[stopped_by]


def _log_to(console: Console | None) -> None:
    """Log lines through rich on the progress bar's console, so they print above the bar
    instead of into it; plain timestamped lines otherwise (files, pipes, --no-progress).
    Libraries that log through absl (orbax-checkpoint, reading an Orbax checkpoint) say only
    warnings: their INFO lines are their internals, not the run's."""
    logging.getLogger("absl").setLevel(logging.WARNING)
    if console is None:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        return
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, log_time_format="%H:%M:%S")
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])
