"""The command line: run campaigns, print the figures, exit 1 if any promise was broken.

Trials are numbered from ``--seed`` (a fresh random start by default, printed, so that every CI
run looks at new cases); everything random in trial N derives from N alone. A failing trial
reruns on its own with ``--campaign NAME --seed N --trials 1`` (kill timings still vary a
little: the seed fixes the operation, the sizes and the moment as a fraction of the operation).
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import time
import traceback

from rich.console import Console

from stress import backends, corrupt, diskfull, faults, fuzz, gc_race, kill
from stress.report import Result, print_report

CAMPAIGNS = {m.NAME: m for m in (kill, corrupt, fuzz, diskfull, faults, gc_race)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stress", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--short",
        dest="mode",
        action="store_const",
        const="short",
        help="every campaign briefly: CI, within 3 minutes on 2 cores (default)",
    )
    mode.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="hundreds of trials per campaign (on demand; about an hour)",
    )
    p.add_argument(
        "--campaign",
        action="append",
        choices=sorted(CAMPAIGNS),
        help="run only this campaign (repeatable)",
    )
    p.add_argument("--seed", type=int, metavar="N", help="first trial number (default: random)")
    p.add_argument("--trials", type=int, metavar="N", help="trials per campaign (default: by mode)")
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    p.set_defaults(mode="short")
    return p.parse_args(argv)


def run_campaign(module, first: int, trials: int, console: Console) -> Result:
    result = Result(module.NAME, module.PROMISE)
    t0 = time.perf_counter()
    console.print(f"[bold]{module.NAME}[/]: {trials} trials from {first} ...")
    try:
        module.run(result, list(range(first, first + trials)))
    except Exception as e:  # the harness itself broke: say so, never report it as a pass
        result.fail(first, f"harness error: {type(e).__name__}: {e}")
        traceback.print_exc()
    result.seconds = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("stepsafe").setLevel(logging.ERROR)  # the trials' routine warnings
    console = Console(highlight=False, width=120)
    first = args.seed if args.seed is not None else secrets.randbelow(10**9)
    names = args.campaign or list(CAMPAIGNS)
    console.print(f"stepsafe stress --{args.mode}, trials numbered from {first}")
    results = []
    try:
        for name in names:
            module = CAMPAIGNS[name]
            trials = args.trials if args.trials is not None else module.TRIALS[args.mode]
            results.append(run_campaign(module, first, trials, console))
    finally:
        backends.stop_all()
    print_report(results, args.mode, console)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": args.mode, "first_trial": first,
                       "results": [r.to_json() for r in results]}, f, indent=1)  # fmt: skip
    broken = [r.campaign for r in results if not r.ok]
    if broken:
        console.print(f"[red]promises broken: {', '.join(broken)}[/]")
        console.print(f"(failing trials' files are kept under {backends.scratch()})")
        return 1
    backends.remove_scratch()
    console.print("[green]every promise held[/]")
    return 0
