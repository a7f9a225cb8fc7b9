"""``stepsafe verify``: re-read every byte of a checkpoint (or of every committed step of a run)
and check every checksum. Exit 1 on any mismatch, missing or truncated file, naming the array,
the file and the offset; 0 when everything matches."""

from __future__ import annotations

import argparse

from rich import box
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from stepsafe.checkpoint.verify import VerifyReport, verify, verify_targets
from stepsafe.cli import common
from stepsafe.cli.common import ExitCode

HELP = "re-read every byte and check every checksum; exit 1 on any damage found"
EXAMPLE = "stepsafe verify outputs/demo/checkpoints/300\n  stepsafe verify outputs/demo"
HINT = "PATH is a step directory, or a run directory (then every committed step is verified)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="a step directory, or a run: all its steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    targets = verify_targets(args.path)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=common.err(),
        transient=True,
        disable=args.no_progress or args.json,
    )
    reports = []
    with progress:
        for path in targets:
            task = progress.add_task(f"verify {path}", total=None)
            reports.append(
                verify(
                    path,
                    lambda done, total, t=task: progress.update(t, completed=done, total=total),
                )
            )
            progress.remove_task(task)
    if args.json:
        common.print_json({"ok": all(r.ok for r in reports), "checkpoints": reports})
    else:
        for r in reports:
            show(r)
    bad = [r for r in reports if not r.ok]
    if bad and not args.json:
        common.error(
            f"{len(bad)} of {len(reports)} checkpoint(s) failed verification",
            "restore an earlier step that verifies, and delete the damaged one",
        )
    return ExitCode.NO if bad else ExitCode.OK


def show(r: VerifyReport) -> None:
    con = common.out()
    what = f"step {r.step}" if r.step is not None else "checkpoint"
    size = common.human_bytes(r.bytes_checked)
    if r.ok:
        con.print(
            f"OK      {escape(r.path)}: {what}, {r.num_arrays} arrays, {r.num_files} data "
            f"file(s), {size} read, every checksum matches"
        )
        return
    con.print(f"FAILED  {escape(r.path)}: {what}, {len(r.problems)} problem(s)")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("Problem", "Array", "File", "Offset", "Length"):
        table.add_column(col, justify="right" if col in ("Offset", "Length") else "left")
    for p in r.problems:
        table.add_row(
            p.kind,
            escape(p.key or "-"),
            escape(p.file),
            "-" if p.offset is None else str(p.offset),
            "-" if p.length is None else str(p.length),
        )
    common.print_uncut(con, table)
    for p in r.problems:
        if p.kind in ("metadata", "unreadable", "size", "incomplete"):
            con.print(f"  {escape(p.message)}")
