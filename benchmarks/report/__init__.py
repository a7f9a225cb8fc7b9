"""Raw run JSON -> the results' markdown: ``RESULTS.md`` for a disk run (``report.disk``),
``RESULTS-buckets.md`` for a bucket run (``report.buckets``).

Every cell is a median over the repeats. Re-render a stored run with
``python -m benchmarks.report benchmarks/out/<run|buckets>-<stamp>.json [OUT.md]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.storages import BUCKETS


def normalise(run: dict[str, Any]) -> dict[str, Any]:
    """Runs recorded before the harness took the storage as a parameter: a disk run had no
    ``storages``; a bucket run had one ``state``, ``servers``, and a ``server`` per record."""
    if "storages" not in run:
        run["storages"] = run.get("servers", ["disk"])
        run["states"] = run.get("states") or [run["state"]]
        for r in run["records"]:
            r.setdefault("storage", r.get("server", "disk"))
    return run


def is_buckets(run: dict[str, Any]) -> bool:
    return all(s in BUCKETS for s in normalise(run)["storages"])


def default_results(run: dict[str, Any]) -> Path:
    here = Path(__file__).resolve().parent.parent
    return here / ("RESULTS-buckets.md" if is_buckets(run) else "RESULTS.md")


def render(run: dict[str, Any], json_path: Path | str) -> str:
    """The markdown of ``run``, whose raw JSON lies at ``json_path``."""
    from benchmarks.report import buckets, disk

    return (buckets if is_buckets(run) else disk).render(normalise(run), json_path)
