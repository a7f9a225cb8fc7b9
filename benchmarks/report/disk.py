"""A disk run -> ``RESULTS.md``: per-state tables, ratios to stepsafe, and the targets.

Every cell is the median over the repeats with the minimum beside it; the first repeat is shown
apart, since a first run can pay for things later ones find done (disk allocation, warm caches).
Re-render a stored run with ``python -m benchmarks.report benchmarks/out/run-<stamp>.json``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks import states
from benchmarks.methods import REGISTRY
from benchmarks.report.disk_targets import targets
from benchmarks.report.runs import Runs

PEERS = ("raw", "safetensors", "torch", "dcp", "orbax")


def _vals(runs: Runs, state: str, method: str, phase: str, field: str = "seconds") -> list[float]:
    return runs.values(field, state=state, method=method, phase=phase, variant=None)


def _med(runs: Runs, state: str, method: str, phase: str, field: str = "seconds") -> float | None:
    return runs.median(field, state=state, method=method, phase=phase, variant=None)


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
        over_save = _med(runs, state, m, "save", "op_peak_bytes")
        over_cold = _med(runs, state, m, "cold", "op_peak_bytes")
        rss_s = _med(runs, state, m, "save", "maxrss_bytes")
        rss_r = _med(runs, state, m, "cold", "maxrss_bytes")
        disk = _med(runs, state, m, "save", "disk_bytes")
        files = _med(runs, state, m, "save", "files")
        cells = [
            REGISTRY[m].label,
            _time_cell(_vals(runs, state, m, "save"), n),
            _time_cell(_vals(runs, state, m, "cold"), n) if kind == "sync" else "—",
            _time_cell(_vals(runs, state, m, "warm"), n) if kind == "sync" else "—",
            _time_cell(_vals(runs, state, m, "save", "blocked_s"), 0) if kind == "async" else "—",
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
    return [*lines, ""]


def _limits_table(runs: Runs, state: str, methods: list[str]) -> list[str]:
    n = states.nbytes(state)
    rows = []
    if "disk" in methods:
        rows += [
            ("O_DIRECT write + fdatasync (dd-like, one 64 MiB buffer)", "disk", "save", "seconds"),
            ("cold O_DIRECT read (cache dropped), one reused buffer", "disk", "cold", "seconds"),
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
        lines.append(f"| {label} | {_time_cell(_vals(runs, state, m, phase, field), n)} |")
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
            vals = _vals(runs, state, m, ph)
            firsts.append(_secs(vals[0]) if vals else "—")
            laters.append(_secs(statistics.median(vals[1:])) if len(vals) > 1 else "—")
        if REGISTRY[m].kind == "async":
            b = _vals(runs, state, m, "save", "blocked_s")
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
            ss, other = _med(runs, state, "stepsafe", phase), _med(runs, state, peer, phase)
            cells.append("—" if not ss or not other else f"{other / ss:.2f}x")
        lines.append(f"| {REGISTRY[peer].label} | {' | '.join(cells)} |")
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
    lines += targets(runs, run["states"])
    lines += ["## Measurements", ""]
    for s in run["states"]:
        lines += _state_table(runs, s, methods)
        lines += _ratio_table(runs, s, methods)
        lines += _limits_table(runs, s, methods)
        lines += _first_table(runs, s, methods)
    lines += many_processes()
    bad = runs.problems()
    if bad:
        lines += ["## Errors", ""]
        for r in bad:
            what = r.get("error", "round trip mismatch").splitlines()[0][:200]
            lines.append(f"- {r['state']} {r['method']} {r['phase']} #{r['repeat'] + 1}: {what}")
        lines.append("")
    return "\n".join(lines)


def many_processes(path: Path = Path(__file__).parents[1] / "RESULTS-multihost.md") -> list[str]:
    """The multi-process rows, quoted from their own run's results (``benchmarks.multihost``
    writes them: many processes need a launcher of their own), so that this file carries them
    too; nothing when that file does not exist yet."""
    if not path.exists():
        return []
    text = path.read_text().split("\n## ")
    keep = [t for t in text[1:] if t.startswith(("In short", "Save and restore"))]
    lines = ["## Many processes (quoted from RESULTS-multihost.md)", ""]
    for section in keep:
        head, _, body = section.partition("\n")
        lines += [f"### {head}", *body.strip("\n").splitlines(), ""]
    return lines
