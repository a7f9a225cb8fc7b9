"""A conversion run (``benchmarks/convert.py``) -> ``RESULTS-convert.md``; re-render a stored one
with ``python -m benchmarks.report.convert benchmarks/out/convert-<stamp>.json [OUT.md]``.

Cells are medians over the repeats, the minimum beside them. Speeds are bytes of array data
written per second (a conversion reads as many as it writes); the copy baseline is the faster
median of the two copies, over every byte of the source's files.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

RERUN = ".venv/bin/python benchmarks/convert.py --snapshot"
MIB = 2**20
LABEL = {
    "copy-user": "copy: `readinto` + `write` (16 MiB buffer) + fsync, every file",
    "copy-kernel": "copy: `sendfile` + fsync, every file",
    "param-only": "`convert_checkpoint(param_only=True, unstack=True, scan_axis=1)`",
    "unstack": "`convert_checkpoint(unstack=True, scan_axis=1)` (whole state)",
    "param-only-stacked": "diagnosis: `convert_checkpoint(param_only=True)`, nothing unstacked",
}


def _ok(recs: list[dict[str, Any]], case: str) -> list[dict[str, Any]]:
    return [r for r in recs if r["case"] == case and "error" not in r]


def _med(vals: list[float]) -> float:
    return statistics.median(vals) if vals else float("nan")


def _rate(r: dict[str, Any]) -> float:
    return r["bytes"] / r["seconds"] / 1e9


def baseline(run: dict[str, Any]) -> tuple[str, float]:
    """The faster copy (by median GB/s) and its GB/s."""
    rates = {c: _med([_rate(r) for r in _ok(run["records"], c)]) for c in LABEL if "copy" in c}
    rates = {c: v for c, v in rates.items() if v == v}
    if not rates:
        return "", float("nan")
    best = max(rates, key=lambda c: rates[c])
    return best, rates[best]


def _others(recs: list[dict[str, Any]], cores: int) -> float:
    """The median share of the machine's CPU that other processes took during a case."""
    return 100 * _med([r["other_cpu_s"] / (cores * r["case_wall_s"]) for r in recs])


def _table(run: dict[str, Any]) -> list[str]:
    src, cores = run["source"], int(run["machine"]["cores"])
    target_rss = src["largest_bytes"] + 256 * MIB
    best, base = baseline(run)
    lines = [
        "| case | bytes | time (median, min) | GB/s | vs copy (target ≥ 0.8x) | peak RSS rise "
        f"(target ≤ {target_rss / MIB:.0f} MiB) | CPU s | load (1 min) | others' CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, label in LABEL.items():
        recs = _ok(run["records"], case)
        if not recs:
            continue
        secs = [r["seconds"] for r in recs]
        rate = _med([_rate(r) for r in recs])
        peak = _med([r["peak_rise"] for r in recs])
        if "copy" in case:
            vs = "**baseline**" if case == best else f"{rate / base:.2f}x"
            rss = f"{peak / MIB:.0f} MiB"
        else:
            ratio = rate / base
            vs = f"**{ratio:.2f}x** {'pass' if ratio >= 0.8 else 'FAIL'}"
            rss = f"**{peak / MIB:.0f} MiB** {'pass' if peak <= target_rss else 'FAIL'}"
        lines.append(
            f"| {label} | {_med([r['bytes'] for r in recs]) / 1e9:.2f} GB | "
            f"**{_med(secs):.2f} s** (min {min(secs):.2f} s) | {rate:.2f} | {vs} | {rss} | "
            f"{_med([r['cpu_s'] for r in recs]):.1f} | {_med([r['load1'] for r in recs]):.1f} | "
            f"{_others(recs, cores):.0f}% |"
        )
    return lines


def _checks(run: dict[str, Any]) -> list[str]:
    out = []
    for r in run["records"]:
        if "error" in r:
            out.append(f"- r{r['repeat']} {r['case']}: **error** `{r['error'][-300:]}`")
        elif "slice_bit_exact" in r:
            out.append(
                f"- {r['case']}: {r['arrays_out']} arrays out, {r['layers_left']} still under "
                f"`layers/`, {r['opt_state_out']} under `opt_state`, step {r['step_out']}; "
                f"`{r['checked']}` equals the source's "
                f"{'array' if r['case'].endswith('stacked') else 'slice 3 on axis 1'} bit for "
                f"bit: {r['slice_bit_exact']}"
            )
    return out


def render(run: dict[str, Any]) -> str:
    src, m, v = run["source"], run["machine"], run["versions"]
    best, base = baseline(run)
    cores = int(m["cores"])
    shapes = ", ".join(
        f"`{k.split('/layers/')[1]}` {tuple(s)}" for k, s in list(src["layers_shapes"].items())[:3]
    )
    lines = [
        "# Conversions: param-only and unstacked, against the disk's copy speed",
        "",
        f"Run {run['stamp']}, {run['repeats']} repeats, {run['wall_s'] / 60:.1f} min; "
        f"`{run['command']}`; raw JSON: `benchmarks/out/convert-{run['stamp']}.json` "
        "(git-ignored). Rerun: `" + RERUN + "` (~2.5 min on 2 cores; `--state m95` for a look: "
        "results then go under `out/`).",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, kernel {m['kernel']}; "
        f"disk {m['disk']}. A bursty virtual disk: compare within one run, as ratios.",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "; stepsafe "
        f"{run['stepsafe_source'].get('commit', '?')}.",
        f"- Load: 1-min load average {run['load_at_start'][0]:.2f} at the start, "
        f"{run['load_at_end'][0]:.2f} at the end, on {cores} cores (other sessions' tests and "
        "benchmarks run beside this one); per case in the table.",
        f"- Cold page cache before every case ({run['cold']}); every case in a fresh process, "
        "timed after its imports, to committed (fsync included); peak RSS rise = peak over "
        "the process after imports (Linux's peak reset, `/proc/self/clear_refs`).",
        f"- Source: a training checkpoint of `{run['state']}`'s leaves "
        f"({src['array_bytes'] / 1e9:.2f} GB of float32 in {src['arrays']} arrays, "
        f"{src['on_disk'] / 1e9:.2f} GB on disk in {src['files']} files; params "
        f"{src['params_bytes'] / 1e9:.2f} GB, the rest Adam's mu and nu), saved by "
        "`stepsafe.save`. `states.py`'s states keep `layer_00` .. apart (nothing to unstack), "
        "so the benchmark stacks the same leaves MaxText's way: `params/decoder/layers/..` "
        f"(and `opt_state/{{mu,nu}}/decoder/layers/..`) with the layer axis at 1, e.g. "
        f"{shapes}. The largest array: `{src['largest'][0]}` {tuple(src['largest'][1])}, "
        f"{src['largest_bytes'] / MIB:.0f} MiB; the RSS target is it + 256 MiB.",
        f"- Copy baseline: the faster of the two copies ({best}, {base:.2f} GB/s over every "
        "byte of the source's files), i.e. reading plus writing the bytes once. A conversion's "
        "GB/s are its array bytes written (as many read) per second, so the param-only case "
        "(a third of the bytes) is compared by speed, not time.",
        "- Not measured here (not built yet): Hugging Face safetensors export/import and "
        "Orbax import/export rows of #15's benchmark.",
        "",
        "## Results (median of the repeats)",
        "",
        *_table(run),
        "",
        "Others' CPU: the share of the machine's CPU (all cores) that processes other than the "
        "case took while it ran (`clocks.py`); conversions are CPU-bound in part (checksums, "
        "slicing along axis 1), the kernel copy hardly, so a loaded machine lowers their ratio.",
        "",
        "The diagnosis row (a param-only copy without unstacking) tells the reader and writer's "
        "cost from the unstacking's; its peak above the target is two whole arrays: "
        "while the writer makes an array, the one before it is still referenced (the data "
        "file's stream generator keeps its last piece's `view` until `p.data()` returns, "
        "`format/written.py` `_write_file`, and the local storage's `for chunk in chunks` keeps "
        "its last chunk, `storage/local.py`): ~2x the largest array here "
        f"({src['largest_bytes'] / MIB:.0f} MiB), whose neighbour is as large. "
        "Unstacking writes small slices, so the overlap is one slice, and stays under the "
        "target.",
        "",
        "## Checks (first repeat)",
        "",
        *_checks(run),
        "",
    ]
    if run.get("stepsafe_source_at_end"):
        lines.insert(2, "**WARNING: stepsafe's code changed during the run; results mix "
                        "versions.**\n")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    run = json.loads(Path(argv[0]).read_text())
    text = render(run)
    if len(argv) > 1:
        Path(argv[1]).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
