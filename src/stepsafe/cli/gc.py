"""``stepsafe gc``: delete a run's old checkpoints, keeping the newest N committed ones.

Keeps the newest N intact checkpoints (marker and manifest match their checksums). Also deletes
stale incomplete saves (a newer step is committed, or their local writer process is gone), and
in kept steps the stray files an earlier, dead save of the same step left. Never deletes the
newest intact checkpoint, a save that may still be running, a damaged step, a symbolic link,
nor anything stepsafe did not write (Orbax's checkpoints, a README, other directories); each
deletion removes the commit marker first. ``--dry-run`` prints the plan (every step and stray
file, and why) and deletes nothing.
"""

from __future__ import annotations

import argparse

from rich import box
from rich.markup import escape
from rich.table import Table

from stepsafe.checkpoint.run_layout import CHECKPOINTS_DIR
from stepsafe.cli import common
from stepsafe.manager.gc import GcPlan, gc

HELP = "delete old checkpoints beyond the newest N (and stale incomplete ones); --dry-run first"
EXAMPLE = "stepsafe gc outputs/demo --keep 3 --dry-run"
HINT = f"RUN is <base_output_directory>/<run_name>, the folder holding {CHECKPOINTS_DIR}/"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help=f"a run directory (or its {CHECKPOINTS_DIR}/)")
    p.add_argument("--keep", type=_keep, required=True, help="committed checkpoints to keep (>=1)")
    p.add_argument("--dry-run", action="store_true", help="print what would go; delete nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _keep(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep wants an integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(
            f"--keep must be >= 1 (the newest committed checkpoint is never deleted), got {n}"
        )
    return n


def run(args: argparse.Namespace) -> int:
    plan = gc(args.run_dir, args.keep, dry_run=args.dry_run)
    if args.json:
        common.print_json(as_json(plan))
    else:
        show(plan)
    return 0


def as_json(plan: GcPlan) -> dict:
    def rows(actions: list) -> list[dict]:
        return [
            {
                "step": a.entry.step,
                "path": a.entry.path,
                "status": a.entry.status,
                "size_bytes": a.entry.size_bytes,
                "reason": a.reason,
            }
            for a in actions
        ]

    return {
        "run": plan.run.path,
        "dry_run": plan.dry_run,
        "deleted": plan.done,
        "delete": rows(plan.delete),
        "keep": rows(plan.keep),
        "bytes_freed": plan.bytes_freed if plan.done else 0,
        "stray_files": {str(step): paths for step, paths in plan.strays.items()},
        "stray_reasons": dict(plan.stray_reasons),
        "unfinished_uploads": [{"path": p, "upload_id": u} for p, u in plan.uploads],
    }


def show(plan: GcPlan) -> None:
    con = common.out()
    verb = "Would delete" if plan.dry_run else "Deleted"
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("Step", "Action", "Status", "Size (MB)", "Why"):  # paths in "Why" fold, never cut
        table.add_column(col, justify="right" if col == "Size (MB)" else "left", overflow="fold")
    rows = [(a, verb.lower()) for a in plan.delete] + [(a, "keep") for a in plan.keep]
    for a, action in sorted(rows, key=lambda r: (r[0].entry.step, r[0].entry.name)):
        e = a.entry
        step = f"{e.step} (tmp)" if e.temporary else str(e.step)
        table.add_row(step, action, e.status, common.mb(e.size_bytes), escape(a.reason))
    con.print(f"Run: {escape(plan.run.path)}")
    if plan.run.steps:
        con.print(table)
    n = len(plan.delete)
    con.print(f"{verb} {n} checkpoint(s), {common.mb(plan.bytes_freed)} MB; kept {len(plan.keep)}")
    for step, paths in sorted(plan.strays.items()):
        con.print(
            f"{verb} {len(paths)} stray file(s) in step {step}, left by a save of that step "
            "that died or lost a race:"
        )
        for path in paths:
            con.print(f"  {escape(path)}: {escape(plan.stray_reasons.get(path, ''))}")
    if plan.uploads:
        aborted = "Would abort" if plan.dry_run else "Aborted"
        con.print(f"{aborted} {len(plan.uploads)} unfinished upload(s) left by saves that died")
    if plan.dry_run and (n or plan.strays or plan.uploads):
        con.print("(dry run: nothing was deleted; run again without --dry-run to delete)")
