"""``stepsafe inspect``: what one checkpoint holds, from its manifest alone (no array bytes).

Step, timestamps, format version, user metadata, the kind (training or param-only, stacked or
unstacked: MaxText's four kinds, see ``stepsafe.checkpoint.kind`` for the heuristic), totals
per top-level group and the tree of arrays with dtype, shape, bytes and, for arrays saved from
a JAX device mesh, their sharding (``--depth`` folds it).
"""

from __future__ import annotations

import argparse
import json

from rich import box
from rich.markup import escape
from rich.table import Table

from stepsafe.checkpoint.summary import CheckpointSummary, TreeRow, summarize
from stepsafe.cli import common

HELP = "show one checkpoint: step, metadata, kind, the tree of arrays with sizes (manifest only)"
EXAMPLE = "stepsafe inspect outputs/demo/checkpoints/300 --depth 2"
HINT = (
    "PATH is a step directory (.../checkpoints/<step>), its items/, or a run (its latest step); "
    "Orbax's (MaxText's) too, with stepsafe[orbax]"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="step directory, its items/, or a run directory")
    p.add_argument("--depth", type=_depth, default=None, help="fold the tree below this depth")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _depth(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--depth must be >= 1, got {n}")
    return n


def run(args: argparse.Namespace) -> int:
    s = summarize(args.path)
    if args.json:
        common.print_json(as_json(s, args.depth))
    else:
        show(s, args.depth)
    return 0


def as_json(s: CheckpointSummary, depth: int | None) -> dict:
    i = s.info
    return {
        "path": i.path,
        "step": i.step,
        "init_timestamp": common.iso(i.init_timestamp_nsecs),
        "commit_timestamp": common.iso(i.commit_timestamp_nsecs),
        "format": i.format,
        "format_version": i.format_version,
        "custom_metadata": i.custom_metadata,
        "kind": {
            "label": s.kind.label,
            "training": s.kind.training,
            "stacking": s.kind.stacking,
            "evidence": s.kind.evidence,
        },
        "num_arrays": i.num_arrays,
        "nbytes": i.nbytes,
        "files": i.files,
        "groups": s.groups,
        "arrays": s.arrays,
        "values": s.values,
        "tree": s.tree(depth),
    }


def show(s: CheckpointSummary, depth: int | None) -> None:
    con = common.out()
    i = s.info
    con.print(f"Checkpoint: {escape(i.path)}")
    con.print(f"Step: {i.step}")
    con.print(f"Kind: {s.kind.label}  ({escape(s.kind.evidence)})")
    if i.format == "stepsafe":
        con.print(f"Format version: {i.format_version}")
    else:  # a checkpoint Orbax wrote, read through orbax-checkpoint
        con.print(f"Format: {escape(i.format)}, complete by Orbax's rules")
    con.print(f"Save started: {common.when(i.init_timestamp_nsecs)}")
    con.print(f"Committed: {common.when(i.commit_timestamp_nsecs)}")
    meta = json.dumps(i.custom_metadata, sort_keys=True) if i.custom_metadata else "(none)"
    con.print(f"User metadata: {escape(meta)}")
    data = sum(i.files.values())
    files = f" in {len(i.files)} data file(s) of {common.human_bytes(data)}" if i.files else ""
    con.print(f"Arrays: {i.num_arrays}, {common.human_bytes(i.nbytes)}{files}")
    con.print()
    groups = Table(
        title="Totals by group", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False
    )
    groups.add_column("Group")
    groups.add_column("Arrays", justify="right")
    groups.add_column("Bytes", justify="right")
    groups.add_column("Share", justify="right")
    for g in s.groups:
        share = f"{100 * g.nbytes / i.nbytes:.1f}%" if i.nbytes else "-"
        groups.add_row(escape(g.name), str(g.num_arrays), common.human_bytes(g.nbytes), share)
    common.print_uncut(con, groups)
    folded = f" (folded below depth {depth})" if depth else ""
    tree = Table(title=f"Tree{folded}", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    tree.add_column("Key")
    tree.add_column("DType")
    tree.add_column("Shape")
    tree.add_column("Bytes", justify="right")
    sharded = any(a.sharding is not None for a in s.arrays)
    if sharded:  # (a column only where some array was saved from a device mesh)
        tree.add_column("Sharding")
    for r in s.tree(depth):
        extra = (escape(str(r.sharding or "")),) if sharded else ()
        tree.add_row(*_row(r), *extra)
    common.print_uncut(con, tree)


def _row(r: TreeRow) -> tuple[str, str, str, str]:
    name = "  " * r.level + escape(r.name)
    if not r.is_leaf:
        what = f"{r.num_arrays} array{'s' if r.num_arrays != 1 else ''}"
        what += ", folded" if r.collapsed else ""
        return f"{name}/", f"[dim]{what}[/dim]", "", common.human_bytes(r.nbytes)
    if r.dtype is None:
        return name, type(r.value).__name__, escape(f"= {r.value!r}"), "-"
    return name, r.dtype, str(tuple(r.shape or ())), common.human_bytes(r.nbytes)
