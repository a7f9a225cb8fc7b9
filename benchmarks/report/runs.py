"""Lookups into one run's records, for every report: the values of a field over the repeats."""

from __future__ import annotations

import statistics
from typing import Any


class Runs:
    """The good records of one run, filtered by any of their fields.

    Args:
        run: the run's JSON (``benchmarks.run``).
        skip_disturbed: leave out cases during which other processes or the hypervisor took
            much CPU (``is_disturbed``), while at least one undisturbed repeat remains.
    """

    def __init__(self, run: dict[str, Any], *, skip_disturbed: bool = False) -> None:
        self.run = run
        self.records: list[dict[str, Any]] = run["records"]
        self.cores = int(run["machine"].get("cores") or 1)
        self.skip_disturbed = skip_disturbed

    def values(self, field: str = "seconds", **match: Any) -> list[float]:
        """``field`` of the records whose fields equal ``match`` (a missing field is None), in
        repeat order, errors apart."""
        rs = [
            r
            for r in sorted(self.records, key=lambda r: r["repeat"])
            if all(r.get(k) == v for k, v in match.items())
            and "error" not in r
            and r.get(field) is not None
        ]
        if self.skip_disturbed:
            rs = [r for r in rs if not self.is_disturbed(r)] or rs
        return [r[field] for r in rs]

    def median(self, field: str = "seconds", **match: Any) -> float | None:
        vals = self.values(field, **match)
        return statistics.median(vals) if vals else None

    def is_disturbed(self, r: dict[str, Any], share: float = 0.1) -> bool:
        """Other processes, or the hypervisor (steal), took more than ``share`` of the
        machine's cores during the case: its time is suspect."""
        taken = r.get("other_cpu_s", 0) + r.get("steal_s", 0)
        return bool(r.get("case_wall_s")) and taken > share * self.cores * r["case_wall_s"]

    def disturbed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if self.is_disturbed(r)]

    def problems(self) -> list[dict[str, Any]]:
        """Records that failed, or whose restore did not give back what was saved."""
        return [r for r in self.records if "error" in r or r.get("roundtrip_ok") is False]
