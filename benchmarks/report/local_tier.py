"""A local-tier run (``benchmarks/local_tier.py``) -> ``RESULTS-local-tier.md``; re-render a
stored one with ``python -m benchmarks.report.local_tier benchmarks/out/local-tier-<stamp>.json``.

Time cells are medians over the repeats with the minimum beside them; a manager's first save of
each tier is shown apart (it allocates the staging buffers that later saves reuse).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

RERUN = ".venv/bin/python benchmarks/local_tier.py"
COLD = {
    "drop_caches": "cold: the page cache dropped (`drop_caches`) before each restore, the moto "
    "server's spooled files included",
    "fadvise": "the local files evicted (`posix_fadvise`); the moto server's files may be in "
    "the page cache (warm)",
}


def _secs(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 0.1 else f"{t:.3f} s"


def _cell(vals: list[float], nbytes: int = 0) -> str:
    if not vals:
        return "—"
    med = statistics.median(vals)
    rate = f" ({nbytes / med / 1e9:.2f} GB/s)" if nbytes else ""
    extra = f"<br>min {_secs(min(vals))}" if len(vals) > 1 else ""
    return f"**{_secs(med)}**{rate}{extra}"


def _gb(vals: list[float]) -> str:
    return f"{statistics.median(vals) / 1e9:+.2f} GB" if vals else "—"


def _others(recs: list[dict[str, Any]], cores: int) -> str:
    vals = [r["other_cpu_s"] / (cores * r["case_wall_s"]) for r in recs if r.get("case_wall_s")]
    return f"{statistics.median(vals) * 100:.0f}%" if vals else "—"


def _header(*names: str) -> list[str]:
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


TIERS = {
    "local": "local tier (this machine's disk)",
    "persistent": "persistent tier (S3 bucket, moto on 127.0.0.1)",
}


def _saves(run: dict[str, Any], cores: int) -> list[str]:
    n = run["nbytes"]
    lines = _header(
        "save (async)", "blocked: the caller's clock (`save` returns)", "blocked: the manager's",
        "total: the caller's clock (until `wait_until_finished`)", "total: the manager's",
        "peak RSS over before", "committed", "others' CPU",
    )  # fmt: skip
    for first in (False, True):
        for tier, name in TIERS.items():
            rs = [r for r in run["saves"] if r["tier"] == tier and r["first"] is first]
            if not rs:
                continue
            own = [r for r in rs if "own_total_s" in r]
            label = name + (", a manager's first save of the tier" if first else "")
            ok = all(r["committed"] and r["started"] for r in rs)
            lines.append(
                f"| {label} | {_cell([r['blocked_s'] for r in rs])} | "
                f"{_cell([r['own_blocked_s'] for r in own])} | "
                f"{_cell([r['total_s'] for r in rs], n)} | "
                f"{_cell([r['own_total_s'] for r in own], n)} | "
                f"{_gb([r['peak_over_before'] for r in rs])} | "
                f"{f'{len(rs)}/{len(rs)}' if ok else '**NO**'} | {_others(rs, cores)} |"
            )
    return lines


def _short(path: str) -> str:
    """A path under the repository, relative to it."""
    root = str(Path(__file__).resolve().parents[2]) + "/"
    return path.removeprefix(root)


def _restores(run: dict[str, Any], cores: int) -> list[str]:
    n = run["nbytes"]
    lines = _header(
        "resume (`restore_newest`, fresh manager)", "restored step (expected)", "time",
        "peak RSS over the state", "bit-exact", "from", "others' CPU",
    )  # fmt: skip
    for tier, name in (("local", "local tier holds the newest step"),
                       ("persistent", "local directory wiped: the bucket's step")):  # fmt: skip
        rs = [r for r in run["restores"] if r["tier"] == tier]
        if not rs:
            continue
        steps = sorted({r["step"] for r in rs})
        ok = all(r["bit_exact"] and r["step"] == r["expect"] for r in rs)
        lines.append(
            f"| {name} | {', '.join(map(str, steps))} ({rs[0]['expect']}) | "
            f"{_cell([r['seconds'] for r in rs], n)} | "
            f"{_gb([r['peak_over_state'] for r in rs])} | "
            f"{f'{len(rs)}/{len(rs)}' if ok else '**NO**'} | `{_short(rs[0]['path'])}` | "
            f"{_others(rs, cores)} |"
        )
    return lines


def _kills(run: dict[str, Any]) -> list[str]:
    lines = _header(
        "kill", "SIGKILL once step", "with the local tier: killed at", "resumed at (tier)",
        "**lost**", "held at the kill: local / persistent tier", "persistent only: killed at",
        "resumed at", "**lost**", "restart to resumed (local / persistent only)",
    )  # fmt: skip
    by = {(k["trial"], k["local_tier"]): k for k in run["kills"]}
    for i, at in enumerate(run.get("kill_steps", [])):
        lo, po = by.get((i, True), {}), by.get((i, False), {})

        def g(r: dict[str, Any], key: str) -> str:
            if "error" in r:
                return "ERROR"
            value = r.get(key, "—")
            return "none" if value is None else str(value)

        tier = "" if "tier" not in lo else f" ({lo['tier']})"
        restart = " / ".join(
            f"{r['restart_s']:.1f} s" if "restart_s" in r else "—" for r in (lo, po)
        )
        lines.append(
            f"| {i + 1} | {at} | {g(lo, 'killed')} | {g(lo, 'resumed')}{tier} | "
            f"**{g(lo, 'lost')}** | {g(lo, 'local_held')} / {g(lo, 'persistent_held')} | "
            f"{g(po, 'killed')} | "
            f"{g(po, 'resumed')} | **{g(po, 'lost')}** | {restart} |"
        )
    return lines


def _kill_summary(run: dict[str, Any]) -> str:
    lost = {t: [k["lost"] for k in run["kills"] if k["local_tier"] is t and "lost" in k]
            for t in (True, False)}  # fmt: skip
    errors = sum("error" in k for k in run["kills"])
    if not lost[True] and not lost[False]:
        return "No kill trial finished."
    parts = []
    for t, name in ((True, "with the local tier"), (False, "persistent tier only")):
        v = lost[t]
        if v:
            parts.append(
                f"{name}: lost {min(v)} to {max(v)} steps, median {statistics.median(v):g}"
            )
    return "; ".join(parts) + (f"; {errors} trial(s) failed (see the JSON)" if errors else "") + "."


def render(run: dict[str, Any]) -> str:
    cores = int(run["machine"].get("cores") or 1)
    m, v, src = run["machine"], run["versions"], run["stepsafe_source"]
    reps = run["repeats"]
    cold = COLD.get(run.get("cold", ""), "page cache: not emptied")
    out = [
        "# Local tier (emergency checkpoints, issue #14) against the persistent tier",
        "",
        f"Run `{run['stamp']}`; state `{run['state']}`: {run['nbytes'] / 1e9:.3f} GB float32 in "
        f"{run['leaves']} arrays + step. Rerun: `{RERUN}` (`--help` for the options; "
        f"this run: `{run['command'].strip()}`, {run.get('wall_s', 0) / 60:.1f} min). Method: "
        "the docstring of `benchmarks/local_tier.py`.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, kernel {m['kernel']}; disk "
        f"{m['disk']}. The moto server shares the cores with the client, and other work on this "
        'machine may run beside ("others\' CPU": the share of all cores that neither this '
        "process nor the server used): read these as ratios on this machine.",
        "",
        "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
        "",
        f"stepsafe: {src.get('commit', '?')} (code hash {src.get('hash', '?')})"
        + (" — **code changed during the run**" if "stepsafe_source_at_end" in run else ""),
        "",
        f"## Saves: one process, one `CheckpointManager` (async) holding both tiers, {reps} "
        "repeat(s)",
        "",
        "Each save alone (the previous one committed first; retention deletes nothing). The "
        "caller's clock: around `save`, and until `wait_until_finished` returns. The manager's: "
        "the persistent tier's `manager.last_save_seconds`, the local tier's own log line "
        "(`Saved local checkpoint ... blocked, total`); both start after the check that the "
        "step is not there yet (on the bucket, a listing). Peak RSS over before: what the save "
        "added to the process at its peak: a manager's first save allocates its staging "
        "buffers; a bucket upload holds its parts in flight (`storage/budget.py`, "
        "`S3_PARTS_IN_FLIGHT`).",
        "",
        *_saves(run, cores),
        "",
        f"## Restores: a resume from each tier, {reps} repeat(s); {cold}",
        "",
        *_restores(run, cores),
        "",
        f"## Steps lost to a SIGKILL: `stepsafe train`, local_checkpoint_period="
        f"{run['local_period']}, checkpoint_period={run['checkpoint_period']}",
        "",
        f"The demo trainer (`{' '.join(run['train'])}`, steps={run['train_steps']}; persistent "
        "tier on this machine's disk) killed once it logged the step drawn (a fixed draw), then "
        "restarted: lost = the last step it logged - the step it resumed at. The same kill "
        "without the local tier (flags otherwise the same) beside it. A kill lands a few steps "
        "after the step asked for: a step takes milliseconds. A kill while the newest local save "
        "is still being written loses that step too (it never committed): then the run resumes "
        "one local period further back, and loses up to the period plus the steps the save "
        "took.",
        "",
        *_kills(run),
        "",
        _kill_summary(run),
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        text = render(json.load(f))
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            f.write(text)
    else:
        print(text)
