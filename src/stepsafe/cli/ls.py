"""``stepsafe ls``: every run under a base output directory and its checkpoints.

Per run a table (Step, Size (MB), Files, Status, Created, with its time zone, and Metrics when a
step was saved with ``metrics``: ``loss=1.23``), the run's totals
and its latest committed checkpoint; then the grand total. "Incomplete" is a step that was never
committed (a save that died or is still running): restore and resume never pick it. "Damaged"
is a committed step whose metadata or manifest is corrupt; "Symlink", "Orbax", "Foreign" and
"Unreadable" entries are not stepsafe's own: each is listed with why, and gc never deletes it.
"""

from __future__ import annotations

import argparse
import datetime

from rich import box
from rich.markup import escape
from rich.table import Table

from stepsafe.checkpoint.run_layout import CHECKPOINTS_DIR
from stepsafe.cli import common
from stepsafe.errors import CheckpointNotFoundError
from stepsafe.manager.inventory import (
    COMPLETE,
    DAMAGED,
    INCOMPLETE,
    Inventory,
    RunInventory,
    StepEntry,
    list_runs,
)
from stepsafe.storage import storage_for

HELP = "list runs and their checkpoints (size, files, complete or not, created)"
EXAMPLE = "stepsafe ls outputs --run-name demo\n  stepsafe ls outputs --json"
HINT = f"pass the base_output_directory, the folder that holds <run_name>/{CHECKPOINTS_DIR}/"
RULE = "=" * 80


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", metavar="BASE", help="base output directory (or one run directory)")
    p.add_argument("--run-name", help="only this run")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    storage, path = storage_for(args.base)
    if not storage.is_dir(path):
        raise CheckpointNotFoundError(f"{args.base} does not exist or is not a directory")
    inv = list_runs(args.base, args.run_name)
    if args.run_name and not inv.runs:
        raise CheckpointNotFoundError(f"no run {args.run_name!r} under {args.base}")
    if args.json:
        common.print_json(as_json(inv))
    else:
        show(inv)
    return 0


def as_json(inv: Inventory) -> dict:
    return {
        "base": inv.base,
        "runs": [
            {
                "name": r.name,
                "path": r.path,
                "checkpoints": [_step_json(s) for s in r.steps],
                "num_checkpoints": len(r.steps),
                "num_complete": len(r.complete),
                "size_bytes": r.size_bytes,
                "latest_step": r.latest.step if r.latest else None,
            }
            for r in inv.runs
        ],
        "num_runs": len(inv.runs),
        "num_checkpoints": inv.num_checkpoints,
        "size_bytes": inv.size_bytes,
    }


def _step_json(s: StepEntry) -> dict:
    return {
        "step": s.step,
        "name": s.name,
        "path": s.path,
        "size_bytes": s.size_bytes,
        "files": s.num_files,
        "status": s.status,
        "detail": s.detail,
        "temporary": s.temporary,
        "created": common.iso(s.created_nsecs),
        "created_nsecs": s.created_nsecs,
        "metrics": dict(s.metrics),
    }


def show(inv: Inventory) -> None:
    con = common.out()
    con.print(RULE)
    con.print("STEPSAFE CHECKPOINT INSPECTOR")
    con.print(RULE)
    con.print(f"Path: {inv.base}")
    if not inv.runs:
        con.print(
            f"\nNo runs found (expected <run_name>/{CHECKPOINTS_DIR}/<step>/ under this path)."
        )
    for r in inv.runs:
        _show_run(con, r)
    con.print()
    con.print(RULE)
    con.print(
        f"Grand Total: {len(inv.runs)} run(s), {inv.num_checkpoints} checkpoint(s), "
        f"{common.mb(inv.size_bytes)} MB"
    )
    con.print(RULE)


def _show_run(con, r: RunInventory) -> None:
    con.print()
    con.print(RULE)
    con.print(f"Run: {r.name}")
    con.print(RULE)
    con.print(f"Found {len(r.steps)} checkpoint(s):")
    if not r.steps:
        return
    con.print()
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("Step", justify="left", min_width=8)
    table.add_column("Size (MB)", justify="right", min_width=10)
    table.add_column("Files", justify="right", min_width=6)
    table.add_column("Status", min_width=12)
    table.add_column("Created", min_width=23)
    with_metrics = any(s.metrics for s in r.steps)
    if with_metrics:  # a run saved without metrics keeps the table it always had
        table.add_column("Metrics")
    for s in r.steps:
        step = f"{s.step} (tmp)" if s.temporary else str(s.step)
        colour = {COMPLETE: "", DAMAGED: "red"}.get(s.status, "yellow")
        status = f"[{colour}]{s.status}[/{colour}]" if colour else s.status
        row = [step, common.mb(s.size_bytes), str(s.num_files), status, when(s.created_nsecs)]
        table.add_row(*row, *([metrics_text(s.metrics)] if with_metrics else []))
    con.print(table)
    for s in r.steps:
        if s.status not in (COMPLETE, INCOMPLETE):
            con.print(f"  {escape(s.name)}: {s.status}: {escape(s.detail)}")
    con.print("-" * 80)
    n_inc = len(r.incomplete)
    others = len(r.steps) - len(r.complete) - n_inc
    extra = f" ({n_inc} incomplete)" if n_inc else ""
    extra += f" ({others} not intact or not stepsafe's)" if others else ""
    con.print(f"Run total: {len(r.steps)} checkpoint(s){extra}, {common.mb(r.size_bytes)} MB")
    con.print()
    latest = r.latest
    if latest is None:
        con.print("Latest checkpoint: none committed")
        return
    con.print(f"Latest checkpoint: Step {latest.step}")
    con.print(f"  Size: {common.mb(latest.size_bytes)} MB")
    con.print(f"  Files: {latest.num_files}")


def metrics_text(metrics: dict[str, int | float]) -> str:
    """``loss=1.23 acc=0.9``: a step's metrics, short (4 significant digits), or "-"."""
    if not metrics:
        return "-"
    return escape(" ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))


def when(nsecs: int | None) -> str:
    """Local time to the second with its zone (``2026-11-30 20:41:07 UTC``), or "-": a listing
    read on another machine, or next to a UTC log, must not be an hour off unnoticed."""
    if nsecs is None:
        return "-"
    t = datetime.datetime.fromtimestamp(nsecs / 1e9).astimezone()
    return t.strftime("%Y-%m-%d %H:%M:%S ") + (t.strftime("%Z") or t.strftime("%z"))
