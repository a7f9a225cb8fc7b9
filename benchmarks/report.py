"""Raw run JSON -> ``RESULTS.md``: per-state tables, ratios to stepsafe, and the targets.

Every cell is the median over the repeats with the minimum beside it; the first repeat is shown
apart, since a first run can pay for things later ones find done (disk allocation, warm caches).
Re-render a stored run with ``python -m benchmarks.report benchmarks/out/run-<stamp>.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import states
from benchmarks.methods import REGISTRY

PEERS = ("raw", "safetensors", "torch", "dcp", "orbax")


class Runs:
    """Lookups into one run's records: the values of a field, in repeat order."""

    def __init__(self, run: dict[str, Any]) -> None:
        self.run = run
        self.records: list[dict[str, Any]] = run["records"]

    def values(self, state: str, method: str, phase: str, field: str = "seconds") -> list[float]:
        return [
            r[field]
            for r in sorted(self.records, key=lambda r: r["repeat"])
            if (r["state"], r["method"], r["phase"]) == (state, method, phase)
            and "error" not in r
            and r.get(field) is not None
        ]

    def median(self, state: str, method: str, phase: str, field: str = "seconds") -> float | None:
        vals = self.values(state, method, phase, field)
        return statistics.median(vals) if vals else None

    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "error" in r or r.get("roundtrip_ok") is False]


def _secs(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 0.1 else f"{t:.3f} s"


def _time_cell(vals: list[float], nbytes: int) -> str:
    if not vals:
        return "—"
    med = statistics.median(vals)
    rate = "" if nbytes < 1 << 20 else f" ({nbytes / med / 1e9:.2f} GB/s)"
    extra = f"<br>min {_secs(min(vals))}" if len(vals) > 1 else ""
    return f"**{_secs(med)}**{rate}{extra}"


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _over_cell(extra: float | None, n: int) -> str:
    """Extra memory as % of the state, or in MB where the state is too small for a ratio."""
    if extra is None:
        return "—"
    return _pct(extra / n) if n >= 1 << 20 else f"{extra / 1e6:+.2f} MB"


def _gb(x: float | None) -> str:
    return "—" if not x else f"{x / 1e9:.2f} GB"


def _state_table(runs: Runs, state: str, methods: list[str]) -> list[str]:
    n = states.nbytes(state)
    lines = [
        f"### {state}: {n / 1e9:.3f} GB in {len(states.specs(state))} arrays + step",
        "",
        "| method | durable save | cold restore | warm restore | async: caller blocked "
        "| peak RSS over state: save / restore | ru_maxrss save / restore | on disk | files |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        kind = REGISTRY[m].kind
        if kind == "memcpy" or m == "disk":
            continue
        over_save = runs.median(state, m, "save", "op_peak_bytes")
        over_cold = runs.median(state, m, "cold", "op_peak_bytes")
        rss_s = runs.median(state, m, "save", "maxrss_bytes")
        rss_r = runs.median(state, m, "cold", "maxrss_bytes")
        disk = runs.median(state, m, "save", "disk_bytes")
        files = runs.median(state, m, "save", "files")
        cells = [
            REGISTRY[m].label,
            _time_cell(runs.values(state, m, "save"), n),
            _time_cell(runs.values(state, m, "cold"), n) if kind == "sync" else "—",
            _time_cell(runs.values(state, m, "warm"), n) if kind == "sync" else "—",
            _time_cell(runs.values(state, m, "save", "blocked_s"), 0) if kind == "async" else "—",
            f"{_over_cell(over_save, n)} / {_over_cell(over_cold, n)}",
            f"{_gb(rss_s)} / {_gb(rss_r)}",
            "—"
            if disk is None
            else f"{disk / 1e9:.3f} GB"
            if disk > 1e7
            else f"{disk / 1e3:.0f} kB",
            "—" if files is None else f"{files:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if "stepsafe" in methods and "stepsafe-thread" not in methods:
        lines.append("| stepsafe async | n/a (no async API yet) | | | n/a | | | | |")
    return [*lines, ""]


def _limits_table(runs: Runs, state: str, methods: list[str]) -> list[str]:
    n = states.nbytes(state)
    rows = []
    if "disk" in methods:
        rows += [
            ("write + fdatasync (dd-like, one reused 64 MiB buffer)", "disk", "save", "seconds"),
            ("cold read (cache dropped) into one reused buffer", "disk", "cold", "seconds"),
            ("warm read into one reused buffer", "disk", "warm", "seconds"),
        ]
    if "memcpy" in methods:
        rows += [
            (
                "memcpy into fresh memory (first touch in the process)",
                "memcpy",
                "memcpy",
                "fresh_s",
            ),
            (
                "memcpy into fresh memory, again (pages the guest already backs)",
                "memcpy",
                "memcpy",
                "fresh_again_s",
            ),
            ("memcpy into pre-touched memory", "memcpy", "memcpy", "pretouched_s"),
        ]
    if not rows:
        return []
    lines = [f"Physical limits, {state} byte count:", "", "| limit | time |", "|---|---|"]
    for label, m, phase, field in rows:
        lines.append(f"| {label} | {_time_cell(runs.values(state, m, phase, field), n)} |")
    return [*lines, ""]


def _first_table(runs: Runs, state: str, methods: list[str]) -> list[str]:
    lines = [
        f"First repeat alone, {state}: save / cold / warm (async: blocked / done)",
        "",
        "| method | first run | later runs (median) |",
        "|---|---|---|",
    ]
    for m in methods:
        if REGISTRY[m].kind == "memcpy":
            continue
        phases = ["save", "cold", "warm"] if REGISTRY[m].kind == "sync" else ["save"]
        firsts, laters = [], []
        for ph in phases:
            vals = runs.values(state, m, ph)
            firsts.append(_secs(vals[0]) if vals else "—")
            laters.append(_secs(statistics.median(vals[1:])) if len(vals) > 1 else "—")
        if REGISTRY[m].kind == "async":
            b = runs.values(state, m, "save", "blocked_s")
            firsts.insert(0, _secs(b[0]) if b else "—")
            laters.insert(0, _secs(statistics.median(b[1:])) if len(b) > 1 else "—")
        lines.append(f"| {REGISTRY[m].label} | {' / '.join(firsts)} | {' / '.join(laters)} |")
    return [*lines, ""]


def _ratio_table(runs: Runs, state: str, methods: list[str]) -> list[str]:
    if "stepsafe" not in methods:
        return []
    lines = [
        f"stepsafe's speed over each method's, {state} (peer time / stepsafe time, medians; "
        "> 1: stepsafe faster)",
        "",
        "| vs | save | cold restore | warm restore |",
        "|---|---|---|---|",
    ]
    for peer in [p for p in (*PEERS, "disk") if p in methods]:
        cells = []
        for phase in ("save", "cold", "warm"):
            ss, other = runs.median(state, "stepsafe", phase), runs.median(state, peer, phase)
            cells.append("—" if not ss or not other else f"{other / ss:.2f}x")
        lines.append(f"| {REGISTRY[peer].label} | {' | '.join(cells)} |")
    return [*lines, ""]


Check = tuple[str, str, Callable[[Runs], tuple[float, float] | None], str, bool]


def _ratio(
    a: tuple[str, str, str, str], b: tuple[str, str, str, str]
) -> Callable[[Runs], tuple[float, float] | None]:
    """(median of b) / (median of a), each given as (state, method, phase, field)."""

    def f(runs: Runs) -> tuple[float, float] | None:
        x, y = runs.median(*a), runs.median(*b)
        return None if not x or y is None else (y / x, 0.0)

    return f


def _faster_of(state: str, phase: str, peers: tuple[str, ...]) -> Callable[[Runs], Any]:
    def f(runs: Runs) -> tuple[float, float] | None:
        ss = runs.median(state, "stepsafe", phase)
        others = [t for p in peers if (t := runs.median(state, p, phase))]
        return None if not ss or not others else (min(others) / ss, 0.0)

    return f


def _over(state: str, phase: str) -> Callable[[Runs], Any]:
    def f(runs: Runs) -> tuple[float, float] | None:
        v = runs.median(state, "stepsafe", phase, "op_peak_bytes")
        return None if v is None else (v / states.nbytes(state), 0.0)

    return f


def _checks(run_states: list[str]) -> list[Check]:
    """(target, measured as, function -> value, threshold text, higher is better)."""
    out: list[Check] = []
    ss = "stepsafe"
    for s in [s for s in ("m95", "l4g") if s in run_states]:
        out += [
            (f"{s} save ≥ 0.9x raw GB/s", "raw time / stepsafe time",
             _ratio((s, ss, "save", "seconds"), (s, "raw", "save", "seconds")), "0.9", True),
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
        for a, how in (("stepsafe-thread", "thread"), ("stepsafe-staged", "staged")):
            out += [
                (f"{s} async ({how}) blocked ≤ Orbax async blocked", "stepsafe / Orbax, blocked",
                 _ratio((s, "orbax-async", "save", "blocked_s"), (s, a, "save", "blocked_s")),
                 "1", False),
                (f"{s} async ({how}) done ≥ 3x sooner than Orbax async",
                 "Orbax done / stepsafe done",
                 _ratio((s, a, "save", "seconds"), (s, "orbax-async", "save", "seconds")),
                 "3", True),
            ]  # fmt: skip
    if "tiny" in run_states:
        for phase, what in (("save", "save"), ("cold", "cold restore"), ("warm", "warm restore")):
            out.append(
                (f"tiny {what} ≤ 2x raw time", "stepsafe time / raw time",
                 _ratio(("tiny", "raw", phase, "seconds"), ("tiny", ss, phase, "seconds")),
                 "2", False)
            )  # fmt: skip
    return out


def _targets(runs: Runs, run_states: list[str]) -> list[str]:
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


def _header(run: dict[str, Any], json_path: Path | str) -> list[str]:
    m, v, src = run["machine"], run["versions"], run.get("stepsafe_source", {})
    cold = {
        "drop_caches": "`sync; echo 3 > /proc/sys/vm/drop_caches` before every cold restore",
        "fadvise": "`posix_fadvise(POSIX_FADV_DONTNEED)` on every file after `sync` "
        "(drop_caches not permitted)",
    }[run["cold_method"]]
    return [
        "# Benchmark results",
        "",
        f"Run {run['started']}, {run['repeats']} repeats, {run.get('elapsed_s', 0) / 60:.1f} min;"
        f" `benchmarks/run {' '.join(run['argv'])}`; raw JSON: `{json_path}` (git-ignored).",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, kernel {m['kernel']}",
        f"- Disk: {m['disk']}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- stepsafe imported from {src.get('path')} (git {src.get('commit')}, code hash "
        f"{src.get('hash')})"
        + (
            "; **its code changed during the run: the results mix versions**"
            if "stepsafe_source_at_end" in run
            else ", unchanged through the run"
        ),
        f"- Cold restore: {cold}. Warm restore: every file read once just before.",
        "- Each case runs in a fresh process; imports and building the state are outside the "
        "clock. Saves are durable when the clock stops: peers' files and directories are "
        "fsynced inside the timed region (safetensors and torch.save do not fsync at all).",
        "- Peak RSS over state: the operation's peak RSS (Linux peak reset before it) minus RSS "
        "before it, minus the restored state itself for restores, over the state's size. "
        "ru_maxrss: the whole child process, imports and state included.",
        "- The disk is a bursty virtual disk: compare within one run, as ratios.",
        "",
    ]


def render(run: dict[str, Any], json_path: Path | str) -> str:
    runs = Runs(run)
    methods = [m for m in run["methods"] if m in REGISTRY]
    lines = _header(run, json_path)
    lines += _targets(runs, run["states"])
    lines += ["## Measurements", ""]
    for s in run["states"]:
        lines += _state_table(runs, s, methods)
        lines += _ratio_table(runs, s, methods)
        lines += _limits_table(runs, s, methods)
        lines += _first_table(runs, s, methods)
    bad = runs.errors()
    if bad:
        lines += ["## Errors", ""]
        for r in bad:
            what = r.get("error", "round trip mismatch").splitlines()[0][:200]
            lines.append(f"- {r['state']} {r['method']} {r['phase']} #{r['repeat'] + 1}: {what}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    path = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent / "RESULTS.md"
    out.write_text(render(json.loads(path.read_text()), path))
