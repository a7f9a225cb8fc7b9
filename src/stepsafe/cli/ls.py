"""``stepsafe ls``: every run under a base output directory and its checkpoints.

Per run a table (Step, Size (MB), Files, Status, Created, with its time zone, and Metrics when a
step was saved with ``metrics``: ``loss=1.23``), the run's totals
and its latest committed checkpoint; then the grand total. "Incomplete" is a step that was never
committed (a save that died or is still running): restore and resume never pick it. "Damaged"
is a committed step whose metadata or manifest is corrupt; "Symlink", "Orbax", "Foreign" and
"Unreadable" entries are not stepsafe's own: each is listed with why, and gc never deletes it.
An Orbax step (MaxText's) is "Orbax" when complete by Orbax's own rules (readable by
``stepsafe inspect``/``convert``/``restore``), "Orbax (incomplete)" otherwise (a
``<step>.orbax-checkpoint-tmp[-*]`` directory, or on GCS no ``commit_success.txt``).

With emergency or multi-tier checkpoints a run has a second tier on each process's own disk,
outside BASE: ``--local <local_checkpoint_directory>/<run_name>`` (once per process's
directory) lists it in a table of its own, "Local tier: DIR", with the same columns and one
more, Holds: the whole state (one process) or "process p of N's shards" (a step of a job of N
processes, which restores only on process p of a job of N, on the same mesh). A resume takes
the newest local step that every process holds when it is newer than the persistent latest.
"""

from __future__ import annotations

import argparse
import datetime
import posixpath
from collections.abc import Sequence

from rich import box
from rich.markup import escape
from rich.table import Table

from stepsafe.checkpoint.run_layout import CHECKPOINTS_DIR
from stepsafe.cli import common
from stepsafe.cli.ls_local import LocalStep, LocalTierListing, scan_local
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

HELP = "list runs and their checkpoints (size, files, complete or not, created), both tiers"
EXAMPLE = (
    "stepsafe ls outputs --run-name demo\n  stepsafe ls outputs --json\n"
    "  stepsafe ls outputs/demo --local /tmp/stepsafe-local/demo"
)
HINT = (
    f"pass the base_output_directory, the folder that holds <run_name>/{CHECKPOINTS_DIR}/, "
    "and with --local a run's <local_checkpoint_directory>/<run_name>"
)
RULE = "=" * 80


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", metavar="BASE", help="base output directory (or one run directory)")
    p.add_argument("--run-name", help="only this run")
    p.add_argument(
        "--local",
        metavar="DIR",
        action="append",
        default=[],
        help="also list this local tier, <local_checkpoint_directory>/<run_name> (emergency "
        "and multi-tier checkpoints); repeat it for each process's directory",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    storage, path = storage_for(args.base)
    if not storage.is_dir(path):
        raise CheckpointNotFoundError(f"{args.base} does not exist or is not a directory")
    inv = list_runs(args.base, args.run_name)
    if args.run_name and not inv.runs:
        raise CheckpointNotFoundError(f"no run {args.run_name!r} under {args.base}")
    local = [scan_local(d) for d in args.local]  # every path checked before anything prints
    if args.json:
        common.print_json(as_json(inv, local))
    else:
        show(inv, local)
    return 0


def as_json(inv: Inventory, local: Sequence[LocalTierListing] = ()) -> dict:
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
        "local_tiers": [
            {
                "path": t.path,
                "checkpoints": [_local_json(s) for s in t.steps],
                "num_checkpoints": len(t.steps),
                "num_complete": sum(s.entry.complete for s in t.steps),
                "size_bytes": t.size_bytes,
                "latest_step": t.latest.step if t.latest else None,
                "steps_below": t.elsewhere,
            }
            for t in local
        ],
    }


def _local_json(s: LocalStep) -> dict:
    return {
        **_step_json(s.entry),
        "holds": s.holds,
        "process_index": s.process_index,
        "process_count": s.process_count,
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
        "orbax_complete": s.orbax_complete,
    }


def show(inv: Inventory, local: Sequence[LocalTierListing] = ()) -> None:
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
    for t in local:
        _show_local(con, t, _run_of(inv, t))
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
    con.print(_table(r.steps))
    _details(con, r.steps)
    con.print("-" * 80)
    con.print(f"Run total: {_count(r.steps)}, {common.mb(r.size_bytes)} MB")
    con.print()
    latest = r.latest
    orbax = [s.step for s in r.steps if s.orbax_complete and not s.temporary]
    if latest is None:
        con.print("Latest checkpoint: none committed")
        if orbax:  # a MaxText run: what restore, inspect and convert read from the run
            con.print(f"Latest complete Orbax checkpoint: Step {orbax[-1]}")
        return
    con.print(f"Latest checkpoint: Step {latest.step}")
    con.print(f"  Size: {common.mb(latest.size_bytes)} MB")
    con.print(f"  Files: {latest.num_files}")


def _table(steps: list[StepEntry], holds: list[str] | None = None) -> Table:
    """The rows of a tier: Step, Size (MB), Files, Status, Created, [Holds], [Metrics]."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("Step", justify="left", min_width=8)
    table.add_column("Size (MB)", justify="right", min_width=10)
    table.add_column("Files", justify="right", min_width=6)
    table.add_column("Status", min_width=12)
    table.add_column("Created", min_width=23)
    if holds is not None:
        table.add_column("Holds")
    with_metrics = any(s.metrics for s in steps)
    if with_metrics:  # a run saved without metrics keeps the table it always had
        table.add_column("Metrics")
    for i, s in enumerate(steps):
        step = f"{s.step} (tmp)" if s.temporary else str(s.step)
        colour = {COMPLETE: "", DAMAGED: "red"}.get(s.status, "yellow")
        text = f"{s.status} (incomplete)" if s.orbax_complete is False else s.status
        status = f"[{colour}]{text}[/{colour}]" if colour else text
        row = [step, common.mb(s.size_bytes), str(s.num_files), status, when(s.created_nsecs)]
        row += [escape(holds[i])] if holds is not None else []
        table.add_row(*row, *([metrics_text(s.metrics)] if with_metrics else []))
    return table


def _count(steps: list[StepEntry]) -> str:
    """``6 checkpoint(s) (3 incomplete)``: how many, and how many cannot be restored."""
    n_inc = sum(s.status == INCOMPLETE for s in steps)
    others = sum(not s.complete for s in steps) - n_inc
    extra = f" ({n_inc} incomplete)" if n_inc else ""
    extra += f" ({others} not intact or not stepsafe's)" if others else ""
    return f"{len(steps)} checkpoint(s){extra}"


def _details(con, steps: list[StepEntry]) -> None:
    for s in steps:
        if s.status not in (COMPLETE, INCOMPLETE):
            con.print(f"  {escape(s.name)}: {s.status}: {escape(s.detail)}")


def _run_of(inv: Inventory, t: LocalTierListing) -> RunInventory | None:
    """The listed run a local tier belongs to: the one named as its directory (a local tier is
    ``<local_checkpoint_directory>/<run_name>``), else the only run listed."""
    name = posixpath.basename(t.path.rstrip("/"))
    named = [r for r in inv.runs if r.name == name]
    if named:
        return named[0]
    return inv.runs[0] if len(inv.runs) == 1 else None


def _show_local(con, t: LocalTierListing, run: RunInventory | None) -> None:
    con.print()
    con.print(RULE)
    con.print(f"Local tier: {escape(t.path)}" + (f" (run {escape(run.name)})" if run else ""))
    con.print(RULE)
    con.print(f"Found {len(t.steps)} local checkpoint(s):")
    for below in t.elsewhere:
        con.print(f"  {escape(below)} holds some: pass --local {escape(below)}")
    if not t.steps:
        return
    con.print()
    con.print(_table([s.entry for s in t.steps], [s.holds or "-" for s in t.steps]))
    _details(con, [s.entry for s in t.steps])
    con.print("-" * 80)
    con.print(f"Local total: {_count([s.entry for s in t.steps])}, {common.mb(t.size_bytes)} MB")
    con.print()
    latest = t.latest
    if latest is None:
        con.print("Latest local checkpoint: none committed")
        return
    con.print(f"Latest local checkpoint: Step {latest.step}")
    if run is None:
        return
    persistent = run.latest.step if run.latest is not None else None
    if persistent is None or latest.step >= persistent:
        count = next(s.process_count for s in t.steps if s.entry is latest)
        unless = f" if all {count} processes hold it" if count is not None else ""
        than = (
            "the persistent tier holds no step"
            if persistent is None
            else f"newer than the persistent Step {persistent}"
            if latest.step > persistent
            else "the persistent tier's latest step too (read from here: faster)"
        )
        con.print(f"  {than}: a resume takes it{unless}")
    else:
        con.print(f"  older than the persistent Step {persistent}: a resume takes that one")


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
