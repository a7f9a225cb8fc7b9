"""What a campaign found: trials, failures (each with the number that reruns it), figures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

MAX_SHOWN = 8  # failures printed per campaign (all of them go to --json)


@dataclass
class Failure:
    trial: int  # rerun with --seed <trial> --trials <trials>
    what: str  # one line: the case and the broken promise
    trials: int = 1  # > 1 where a case is drawn within a sequence (hypothesis)


@dataclass
class Result:
    campaign: str
    promise: str
    trials: int = 0
    failures: list[Failure] = field(default_factory=list)
    detected: int = 0  # for detection campaigns: damaging cases caught ...
    damaging: int = 0  # ... out of this many
    counts: dict[str, int] = field(default_factory=dict)  # what the trials saw, by outcome
    seconds: float = 0.0

    def fail(self, trial: int, what: str, trials: int = 1) -> None:
        self.failures.append(Failure(trial, what, trials))

    def count(self, outcome: str, n: int = 1) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + n

    @property
    def failed_trials(self) -> int:
        return len({f.trial for f in self.failures})

    @property
    def ok(self) -> bool:
        return not self.failures and self.trials > 0

    def detection(self) -> str:
        if not self.damaging:
            return "-"
        return f"{100 * self.detected / self.damaging:.1f}% ({self.detected}/{self.damaging})"

    def to_json(self) -> dict[str, Any]:
        return {
            "campaign": self.campaign,
            "promise": self.promise,
            "ok": self.ok,
            "trials": self.trials,
            "failed_trials": self.failed_trials,
            "detected": self.detected,
            "damaging": self.damaging,
            "counts": self.counts,
            "seconds": round(self.seconds, 1),
            "failures": [
                {"trial": f.trial, "trials": f.trials, "what": f.what} for f in self.failures
            ],
        }


def problems_of(trial: Callable[[], list[str]]) -> list[str]:
    """A trial's problems; an exception escaping it (from the library or the harness) is one
    too, so that one bad trial never hides the others."""
    try:
        return trial()
    except Exception as e:
        return [f"the trial raised {type(e).__name__}: {e}"]


def print_report(results: list[Result], mode: str, console: Console) -> None:
    table = Table(title=f"stepsafe stress ({mode})")
    for col in ("campaign", "trials", "failed", "detection", "time", "outcomes", "verdict"):
        table.add_column(col, overflow="fold")
    for r in results:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items()))
        verdict = "[green]OK[/]" if r.ok else "[red]BROKEN[/]"
        table.add_row(
            r.campaign,
            str(r.trials),
            str(r.failed_trials),
            r.detection(),
            f"{r.seconds:.0f} s",
            outcomes,
            verdict,
        )
    console.print(table)
    for r in results:
        if r.ok:
            continue
        console.print(f"[red]{r.campaign}[/]: {r.promise}: broken in {r.failed_trials} trial(s)")
        for f in r.failures[:MAX_SHOWN]:
            console.print(
                f"  trial {f.trial}: {f.what}\n"
                f"    rerun: .venv/bin/python -m stress --campaign {r.campaign} "
                f"--seed {f.trial} --trials {f.trials}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        if len(r.failures) > MAX_SHOWN:
            console.print(f"  ... and {len(r.failures) - MAX_SHOWN} more (--json has them all)")
