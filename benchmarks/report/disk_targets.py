"""The disk run's targets (the project's performance goals), each a pass or a fail in
``RESULTS.md``: stepsafe's medians against raw I/O, torch.load and Orbax, async blocked and done
times, and peak memory over the state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks import states
from benchmarks.report.runs import Runs


def _med(runs: Runs, state: str, method: str, phase: str, field: str = "seconds") -> float | None:
    return runs.median(field, state=state, method=method, phase=phase, variant=None)


Check = tuple[str, str, Callable[[Runs], tuple[float, float] | None], str, bool]


def _ratio(
    a: tuple[str, str, str, str], b: tuple[str, str, str, str]
) -> Callable[[Runs], tuple[float, float] | None]:
    """(median of b) / (median of a), each given as (state, method, phase, field)."""

    def f(runs: Runs) -> tuple[float, float] | None:
        x, y = _med(runs, *a), _med(runs, *b)
        return None if not x or y is None else (y / x, 0.0)

    return f


def _faster_of(state: str, phase: str, peers: tuple[str, ...]) -> Callable[[Runs], Any]:
    def f(runs: Runs) -> tuple[float, float] | None:
        ss = _med(runs, state, "stepsafe", phase)
        others = [t for p in peers if (t := _med(runs, state, p, phase))]
        return None if not ss or not others else (min(others) / ss, 0.0)

    return f


def _over(state: str, phase: str) -> Callable[[Runs], Any]:
    def f(runs: Runs) -> tuple[float, float] | None:
        v = _med(runs, state, "stepsafe", phase, "op_peak_bytes")
        return None if v is None else (v / states.nbytes(state), 0.0)

    return f


def _checks(run_states: list[str]) -> list[Check]:
    """(target, measured as, function -> value, threshold text, higher is better)."""
    out: list[Check] = []
    ss = "stepsafe"
    for s in [s for s in ("m95", "l4g", "l12g") if s in run_states]:
        out += [
            (f"{s} save ≥ 0.9x raw GB/s", "raw time / stepsafe time",
             _ratio((s, ss, "save", "seconds"), (s, "raw", "save", "seconds")), "0.9", True),
            (f"{s} save ≥ 0.95x the disk's limit", "dd-like time / stepsafe time",
             _ratio((s, ss, "save", "seconds"), (s, "disk", "save", "seconds")), "0.95", True),
        ]  # fmt: skip
        if s == "l12g":
            continue  # stepsafe, raw and the disk's limit only (benchmarks.states.ONLY)
        out += [
            (f"{s} save ≥ 3x Orbax", "Orbax time / stepsafe time",
             _ratio((s, ss, "save", "seconds"), (s, "orbax", "save", "seconds")), "3", True),
            (f"{s} cold restore ≥ 0.9x faster of raw, torch.load", "best peer time / stepsafe",
             _faster_of(s, "cold", ("raw", "torch")), "0.9", True),
            (f"{s} cold restore ≥ 2.5x Orbax", "Orbax time / stepsafe time",
             _ratio((s, ss, "cold", "seconds"), (s, "orbax", "cold", "seconds")), "2.5", True),
            (f"{s} warm restore ≥ 0.9x torch.load", "torch.load time / stepsafe time",
             _ratio((s, ss, "warm", "seconds"), (s, "torch", "warm", "seconds")), "0.9", True),
            (f"{s} save peak RSS ≤ +10% of state", "extra RSS / state size",
             _over(s, "save"), "0.10", False),
            (f"{s} restore peak RSS ≤ +10% of state", "extra RSS / state size (cold)",
             _over(s, "cold"), "0.10", False),
        ]  # fmt: skip
        # JAX arrays, as Orbax saves them; each case is a fresh process, so every measured save
        # is the process's first (the numpy arms are in the measurements, not targets: an
        # async save must copy a numpy leaf, which the caller may change in place)
        for a, how in (("stepsafe-async", "CheckpointManager"), ("stepsafe-thread", "thread")):
            out += [
                (f"{s} async ({how}) blocked ≤ Orbax async blocked", "stepsafe / Orbax, blocked",
                 _ratio((s, "orbax-async", "save", "blocked_s"), (s, a, "save", "blocked_s")),
                 "1", False),
                (f"{s} async ({how}) done ≥ 2x sooner than Orbax async",
                 "Orbax done / stepsafe done",
                 _ratio((s, a, "save", "seconds"), (s, "orbax-async", "save", "seconds")),
                 "2", True),
            ]  # fmt: skip
    if "tiny" in run_states:
        for phase, what in (("save", "save"), ("cold", "cold restore"), ("warm", "warm restore")):
            out.append(
                (f"tiny {what} ≤ 2x safetensors' time", "stepsafe time / safetensors time",
                 _ratio(("tiny", "safetensors", phase, "seconds"), ("tiny", ss, phase, "seconds")),
                 "2", False)
            )  # fmt: skip
    return out


def targets(runs: Runs, run_states: list[str]) -> list[str]:
    """The targets' table for the states of the run."""
    lines = [
        "## Targets (medians; pass/fail)",
        "",
        "| target | measured as | value | needs | result |",
        "|---|---|---|---|---|",
    ]
    for name, how, fn, threshold, higher in _checks(run_states):
        got = fn(runs)
        if got is None:
            value, verdict = "n/a", "n/a"
        else:
            v, t = got[0], float(threshold)
            ok = v >= t if higher else v <= t
            value = f"{v * 100:+.1f}%" if "RSS" in name else f"{v:.2f}"
            verdict = "**pass**" if ok else "FAIL"
        need = ("≥ " if higher else "≤ ") + threshold
        lines.append(f"| {name} | {how} | {value} | {need} | {verdict} |")
    return [*lines, ""]
