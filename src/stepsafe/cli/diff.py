"""``stepsafe diff``: what differs between two checkpoints.

Keys added and removed, dtype/shape changes, changed inline values and arrays whose checksums
differ, from the two manifests alone; with ``--values`` also the max absolute difference of
every array pair of equal shape, read one pair at a time so memory stays bounded whatever the
checkpoints' size.

Exit status as diff(1)'s: 0 when the two agree in everything compared (without ``--values``:
keys, dtypes, shapes, inline values and the arrays' checksums; with it, the arrays' values), 1
when they differ, another code (see ``stepsafe --help``) when they could not be compared.
"""

from __future__ import annotations

import argparse

from rich import box
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from stepsafe.checkpoint.diff import CheckpointDiff, diff
from stepsafe.cli import common
from stepsafe.cli.common import ExitCode

HELP = (
    "compare two checkpoints: keys added/removed, shape/dtype changes, --values: max abs diff; "
    "exit 1 when they differ"
)
EXAMPLE = "stepsafe diff outputs/demo/checkpoints/250 outputs/demo/checkpoints/300 --values"
HINT = "A and B are step directories (or runs: their latest steps)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="first checkpoint")
    p.add_argument("b", metavar="B", help="second checkpoint")
    p.add_argument("--values", action="store_true", help="also compare array values (reads both)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    progress = Progress(
        TextColumn("compare arrays"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=common.err(),
        transient=True,
        disable=args.no_progress or args.json or not args.values,
    )
    with progress:
        task = progress.add_task("compare", total=None)
        d = diff(
            args.a,
            args.b,
            values=args.values,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    if args.json:
        common.print_json(d)
    else:
        show(d)
    return ExitCode.OK if equal(d) else ExitCode.NO


def equal(d: CheckpointDiff) -> bool:
    """True when nothing compared differs: the trees, the arrays' checksums where their layouts
    match, and with ``--values`` every array's values."""
    if d.values is not None:
        return d.structure_equal and all(v.equal for v in d.values)
    return d.structure_equal and not d.contents_differ


def show(d: CheckpointDiff) -> None:
    con = common.out()
    con.print(f"A: {escape(d.a)}")
    con.print(f"B: {escape(d.b)}")
    if d.structure_equal:
        con.print(f"Same tree: {d.same} leaves, same keys, dtypes and shapes")
    else:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("Change", "Key", "A", "B"):
            table.add_column(col)
        for key, desc in d.removed.items():
            table.add_row("removed", escape(key), escape(str(desc)), "")
        for key, desc in d.added.items():
            table.add_row("added", escape(key), "", escape(str(desc)))
        for c in d.changed:
            table.add_row("changed", escape(c.key), escape(str(c.before)), escape(str(c.after)))
        common.print_uncut(con, table)
        con.print(
            f"{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed, "
            f"{d.same} unchanged"
        )
    if d.values is None:
        if d.contents_differ:
            shown = ", ".join(escape(k) for k in d.contents_differ[:5])
            more = ", ..." if len(d.contents_differ) > 5 else ""
            con.print(
                f"Contents: {len(d.contents_differ)} array(s) hold other bytes (their checksums "
                f"differ): {shown}{more}; --values says by how much"
            )
        if d.contents_unknown:
            con.print(
                f"Contents: {len(d.contents_unknown)} array(s) are laid out differently, so "
                "their checksums cannot be compared: --values compares them"
            )
        return
    differing = [v for v in d.values if not v.equal]
    if differing:
        table = Table(title="Values", box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
        table.add_column("Key")
        table.add_column("Max abs diff", justify="right")
        for v in sorted(differing, key=lambda v: -(v.max_abs_diff or 0.0)):
            diff_text = "differs" if v.max_abs_diff is None else f"{v.max_abs_diff:.6g}"
            table.add_row(escape(v.key), diff_text)
        common.print_uncut(con, table)
    con.print(f"Values: {len(differing)} of {len(d.values)} compared arrays differ")
