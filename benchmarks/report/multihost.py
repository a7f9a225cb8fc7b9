"""A multi-process run (``benchmarks.multihost``) -> ``RESULTS-multihost.md``; re-render a stored
one with ``python -m benchmarks.report.multihost benchmarks/out/multihost-<stamp>.json``.

A job's time is the latest end minus the earliest start over its processes (one clock for the
whole machine); each cell is the median over the repeats, with the minimum beside it.
"""

from __future__ import annotations

import statistics
from typing import Any

OPS = (("save", "durable save"), ("cold", "cold restore"), ("warm", "warm restore"))


def _good(run: dict[str, Any], label: str) -> list[dict[str, Any]]:
    return [j for j in run["jobs"] if j["label"] == label and "error" not in j and j["records"]]


def job_seconds(job: dict[str, Any], op: str) -> float:
    rs = job["records"]
    return max(r[op]["t1"] for r in rs) - min(r[op]["t0"] for r in rs)


def _med(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


def _gb(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e9:.3f} GB"


def _mb(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e6:.1f} MB"


def _time_cell(vals: list[float], nbytes: int) -> str:
    if not vals:
        return "—"
    med = statistics.median(vals)
    extra = f"<br>min {min(vals):.3f} s" if len(vals) > 1 else ""
    return f"**{med:.3f} s** ({nbytes / med / 1e9:.2f} GB/s){extra}"


def _header(*names: str) -> list[str]:
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


def _labels(run: dict[str, Any]) -> list[tuple[str, str]]:
    out = [
        ("raw", "raw write+fsync / read, 1 process"),
        ("stepsafe", "stepsafe, 1 process, no jax.distributed"),
    ]
    return out + [
        (f"jax-{n}", f"stepsafe, {n} jax.distributed process{'es' * (n > 1)}")
        for n in run["counts"]
    ]


def _summary(run: dict[str, Any]) -> list[str]:
    n = run["nbytes"]
    lines = _header(
        "job", "durable save", "save / raw", "cold restore", "cold / raw", "warm restore",
        "warm / raw", "peak RSS per process: save / cold restore", "restored bit-exact",
        "others' CPU",
    )  # fmt: skip
    raw = {op: _med([job_seconds(j, op) for j in _good(run, "raw")]) for op, _ in OPS}
    for label, name in _labels(run):
        jobs = _good(run, label)
        cells = [name]
        for op, _ in OPS:
            vals = [job_seconds(j, op) for j in jobs]
            cells.append(_time_cell(vals, n))
            med = _med(vals)
            # time ratio raw / this: 1.00 is the disk's speed, below 1 slower than the disk
            cells.append("—" if not med or not raw[op] else f"{raw[op] / med:.2f}")
        peaks = []
        for op in ("save", "cold"):
            peaks.append(_gb(_med([max(r[op]["peak_rss"] for r in j["records"]) for j in jobs])))
        cells.append(" / ".join(peaks))
        ok = all(r["cold_ok"] and r["warm_ok"] for j in jobs for r in j["records"])
        cells.append("yes" if jobs and ok else "**NO**")
        cores = int(run["machine"].get("cores") or 1)
        others = _med(
            [j["other_cpu_s"] / (cores * j["case_wall_s"]) for j in jobs if "case_wall_s" in j]
        )
        cells.append("—" if others is None else f"{others * 100:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _per_process(run: dict[str, Any]) -> list[str]:
    n = run["nbytes"]
    lines = _header(
        "job", "process", "written", "written / (state / N)", "read, cold restore (rchar)",
        "ideal (its unique share)", "read / ideal", "read from the device, cold (read_bytes)",
        "read, warm restore", "peak RSS: save / cold / warm", "cold restore: peak over before",
    )  # fmt: skip
    for label, _ in _labels(run):
        jobs = _good(run, label)
        if not jobs:
            continue
        count = jobs[0]["count"]
        for p in range(count):
            rs = [r for j in jobs for r in j["records"] if r["process"] == p]

            def med(f: Any, rs: list[dict[str, Any]] = rs) -> float | None:
                return _med([f(r) for r in rs])

            written, ideal = med(lambda r: r["written"]), med(lambda r: r["ideal_read"])
            cold = med(lambda r: r["cold"]["rchar"])
            device = med(lambda r: r["cold"]["read_bytes"])
            over = med(lambda r: r["cold"]["peak_over_before"])
            peaks = " / ".join(_gb(med(lambda r, op=op: r[op]["peak_rss"])) for op, _ in OPS)
            lines.append(
                f"| {label} | {p} | {_mb(written)} | {written / (n / count):.3f} | {_mb(cold)} | "
                f"{_mb(ideal)} | {cold / ideal:.3f} | {_mb(device)} | "
                f"{_mb(med(lambda r: r['warm']['rchar']))} | {peaks} | {_mb(over)} |"
            )
    return lines


def _replicated(run: dict[str, Any]) -> list[str]:
    lines = _header(
        "processes", "array", "durable save", "written per process", "ideal per process",
        "max / ideal",
    )  # fmt: skip
    for n in run["counts"]:
        jobs = [j for j in _good(run, f"jax-{n}") if all("replicated" in r for r in j["records"])]
        if not jobs:
            continue
        size = jobs[0]["records"][0]["replicated"]["nbytes"]
        secs = [
            max(r["replicated"]["save"]["t1"] for r in j["records"])
            - min(r["replicated"]["save"]["t0"] for r in j["records"])
            for j in jobs
        ]
        per = [
            _med(
                [
                    r["replicated"]["written"]
                    for j in jobs
                    for r in j["records"]
                    if r["process"] == p
                ]
            )
            for p in range(n)
        ]
        written = ", ".join(_mb(w) for w in per)
        ideal = size / n
        lines.append(
            f"| {n} | {size / 2**20:.0f} MiB, `P()` over {2 * n} devices"
            f" | {_time_cell(secs, size)} | "
            f"{written} | {_mb(ideal)} | {max(per) / ideal:.3f} |"
        )
    return lines


NOTES = (
    "- Jobs: N processes on 127.0.0.1 under jax.distributed, 2 CPU devices each; every leaf"
    ' sharded along its first axis over all 2N devices (`PartitionSpec("data")` on a 1-D mesh;'
    " every m95 leaf's first axis divides by 8, so none is replicated). `raw`: the same bytes"
    " into one file by one process (write, fsync of file and directory), read back with"
    " `readinto`. `stepsafe, 1 process`: numpy leaves, `stepsafe.save` / `stepsafe.restore`"
    " without jax.distributed.",
    "- Time: all processes meet at a barrier; a job's time runs from the earliest start to the"
    " latest end (`time.monotonic`, one clock on this machine). Saves are durable when they"
    " return. Cold restore: the page cache emptied by process 0 between two barriers, method"
    " {cold}; warm restore: every file read once before.",
    "- Repeats go round the jobs; each repeat is a fresh job (fresh processes). GB/s: the"
    " state's bytes over the job's time (the aggregate of the processes). `x / raw`: raw's"
    " time over this time (1.00 = the disk's speed). Others' CPU: the share of the machine's"
    " cores that processes outside the job used while it ran (start-up included), median.",
    "- Written: sizes of the process's data files (`process_<p>.*.data`). Read: the `rchar`"
    " delta of `/proc/self/io` around the restore (bytes through read syscalls, page cache or"
    " not, metadata included; stepsafe reads a local disk with `preadv`); `read_bytes`: what"
    " the block layer fetched for it. Ideal: the unique bytes of the process's addressable"
    " shards of the target. Peak RSS: the process's VmHWM, reset before the operation (the"
    " state the process holds is included); over before: that peak minus the RSS just before"
    " (the restored share itself included).",
)


def _head(run: dict[str, Any]) -> list[str]:
    m, v, src = run["machine"], run["versions"], run["stepsafe_source"]
    scale = "" if run["scale"] == 1.0 else f", every first axis scaled by {run['scale']}"
    changed = "stepsafe_source_at_end" in run
    loads = [j["loadavg_before"][0] for j in run["jobs"]] + [run["loadavg_end"][0]]
    shared = max(loads) > 1.0
    cold = {r.get("cold_method") for j in run["jobs"] for r in j["records"]} - {None}
    return [
        "# Multi-process benchmark results",
        "",
        f"Run {run['stamp']}, {run['repeats']} repeat{'s' * (run['repeats'] > 1)},"
        f" {run['wall_s'] / 60:.1f} min;"
        f" `{run['command']}`; raw JSON: `benchmarks/out/multihost-{run['stamp']}.json`"
        " (git-ignored).",
        "",
        f"- State: {run['state']}{scale}: {run['nbytes'] / 1e9:.3f} GB in {run['leaves']}"
        " float32 arrays + step.",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, kernel {m['kernel']}",
        f"- Disk: {m['disk']}",
        "- Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
        f"- stepsafe imported from {src.get('path')} (git {src.get('commit')}, code hash"
        f" {src.get('hash')}), " + ("**changed during the run**" if changed else "unchanged"),
        f"- Load average (1 min) before each job: {min(loads):.2f} to {max(loads):.2f} on"
        f" {m['cores']} cores"
        + (
            ": **the machine was shared** with other work (tests of other engineers) during the"
            " run; absolute times are noisy, compare within the run"
            if shared
            else ""
        ),
        *(n.format(cold=" or ".join(sorted(cold)) or "?") for n in NOTES),
    ]


def _findings(run: dict[str, Any]) -> list[str]:
    """The issue's questions answered from this run's numbers."""
    out = []
    n_bytes = run["nbytes"]
    for op, name in OPS:
        rates = []
        for n in run["counts"]:
            med = _med([job_seconds(j, op) for j in _good(run, f"jax-{n}")])
            if med:
                rates.append(f"{n}: {n_bytes / med / 1e9:.2f}")
        base = _med([job_seconds(j, op) for j in _good(run, "raw")])
        one = _med([job_seconds(j, op) for j in _good(run, "stepsafe")])
        if rates and base and one:
            out.append(
                f"- {name}, aggregate GB/s by process count: {', '.join(rates)}; stepsafe in one"
                f" plain process {n_bytes / one / 1e9:.2f}, raw {n_bytes / base / 1e9:.2f}."
            )
    reads = [
        r["cold"]["rchar"] / r["ideal_read"]
        for n in run["counts"]
        for j in _good(run, f"jax-{n}")
        for r in j["records"]
    ]
    writes = [
        r["written"] * j["count"] / run["nbytes"]
        for n in run["counts"]
        for j in _good(run, f"jax-{n}")
        for r in j["records"]
    ]
    if reads and writes:
        out.append(
            f"- Per process, over all jobs: written / (state / N) {min(writes):.3f} to"
            f" {max(writes):.3f}; read in a cold restore / ideal {min(reads):.3f} to"
            f" {max(reads):.3f} (the excess: metadata, the manifest every process reads)."
        )
    cores = int(run["machine"].get("cores") or 1)
    if max(run["counts"]) * 2 > cores:
        out.append(
            f"- {cores} cores for up to {max(run['counts'])} processes: warm restores (checksums,"
            " copies onto the devices) are CPU-bound here, so their"
            " aggregate speed can fall with the process count on this machine; the disk-bound"
            " figures (durable save, cold restore) are the ones to compare with raw."
        )
    return out


def render(run: dict[str, Any]) -> str:
    errors = [j for j in run["jobs"] if "error" in j]
    out = _head(run)
    if errors:
        out.append(
            f"- **{len(errors)} job(s) failed** (left out): "
            + "; ".join(
                f"{j['label']} r{j['repeat']}: {j['error'].splitlines()[-1][:200]}" for j in errors
            )
        )
    out += ["", "## In short", "", *_findings(run)]
    out += ["", "## Save and restore", "", *_summary(run)]
    out += ["", "## Per process (medians over the repeats)", "", *_per_process(run)]
    if any("replicated" in r for j in run["jobs"] for r in j["records"]):
        out += [
            "",
            "## Replica-parallel writes: one fully replicated array",
            "",
            "Every process holds the whole array; each unique byte is written once, split among"
            " the replicas. Ideal: the array over N.",
            "",
            *_replicated(run),
        ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # re-render a stored run: python -m benchmarks.report.multihost RUN.json
    import json
    import sys
    from pathlib import Path

    out = Path(sys.argv[2] if len(sys.argv) > 2 else "benchmarks/RESULTS-multihost.md")
    out.write_text(render(json.loads(Path(sys.argv[1]).read_text())))
    print(out)
