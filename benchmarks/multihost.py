"""Save and restore of one state by 1, 2 and 4 jax.distributed processes on this machine, beside
stepsafe in one plain process and the raw disk: ``python -m benchmarks.multihost``.

Each job is N real processes on 127.0.0.1 (2 CPU devices each, ``benchmarks.multihost_worker``),
the state sharded along its first axis over every device of the job. The save is timed from the
common start after a barrier to the last process's end (durable: ``stepsafe.save`` returns when
the commit is); then the checkpoint's files leave the page cache and a cold restore onto the same
sharding is timed, then a warm one. Repeats go round the jobs; tables show medians. Per process:
bytes written (its data files), bytes read during restore (``rchar``) beside its unique share,
peak RSS. A fully replicated array saved by 2 and 4 processes shows how the writes are shared.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import clocks, fsutil, machine
from benchmarks.multihost_worker import scaled_specs
from benchmarks.report.multihost import render

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SCRATCH = OUT / "scratch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_loopback() -> None:
    """gloo (JAX's CPU collectives) listens on the address of ``gethostname()``: refuse to run
    where that is not loopback, so that nothing leaves the machine."""
    try:
        ok = ipaddress.ip_address(socket.gethostbyname(socket.gethostname())).is_loopback
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise SystemExit(f"hostname {socket.gethostname()!r} is not loopback: map it to 127.0.0.1")


def launch(
    kind: str, count: int, base: Path, a: argparse.Namespace
) -> tuple[list[dict[str, Any]], str | None]:
    """Run one job of ``count`` worker processes; their records, or an error text."""
    port = free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "MP_PORT": str(port),
        "MP_COUNT": str(count),
    }
    argv = [sys.executable, "-m", "benchmarks.multihost_worker", kind, str(base), a.state]
    argv += [str(a.scale), str(a.replicated_mib)]
    procs = [
        subprocess.Popen(
            argv,
            env={**env, "MP_INDEX": str(i)},
            cwd=HERE.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    records, errors = [], []
    deadline = time.monotonic() + a.timeout
    for i, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, err = p.communicate()
        lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            errors.append(f"process {i} rc={p.returncode}: {err.strip()[-1500:]}")
        else:
            records.append(json.loads(lines[-1].removeprefix("RESULT ")))
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return records, ("\n".join(errors) or None)


def jobs(counts: list[int]) -> list[tuple[str, str, int]]:
    """(label, worker kind, process count) of every job of one repeat."""
    return [("raw", "raw", 1), ("stepsafe", "numpy", 1)] + [(f"jax-{n}", "jax", n) for n in counts]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multihost", description=__doc__)
    p.add_argument("--state", default="m95", help="a state of benchmarks/states.py")
    p.add_argument("--scale", type=float, default=1.0, help="scale every leaf's first axis")
    p.add_argument("--counts", default="1,2,4", help="process counts, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--replicated-mib", type=float, default=256.0,
                   help="the fully replicated array's size (times --scale); 0: none")  # fmt: skip
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for one job")
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="measure stepsafe as committed at HEAD (edits made during the run cannot mix in)",
    )
    p.add_argument(
        "--results", default=None, help="markdown (default: RESULTS-multihost.md at scale 1)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    a.replicated_mib *= a.scale
    check_loopback()
    counts = [int(x) for x in a.counts.split(",")]
    specs = scaled_specs(a.state, a.scale)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    results = a.results or str(
        HERE / "RESULTS-multihost.md" if a.scale == 1.0 else OUT / f"multihost-{stamp}.md"
    )
    run: dict[str, Any] = {
        "stamp": stamp,
        "command": "python -m benchmarks.multihost "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "state": a.state,
        "scale": a.scale,
        "repeats": a.repeats,
        "counts": counts,
        "nbytes": sum(s.nbytes for s in specs),
        "leaves": len(specs),
        "machine": machine.describe(str(OUT)),
        "versions": machine.versions(("stepsafe", "numpy", "xxhash", "jax", "jaxlib")),
        "stepsafe_source": machine.snapshot_head(OUT) if a.snapshot else machine.stepsafe_source(),
        "loadavg_start": loadavg(),
        "jobs": [],
    }
    t_start = time.monotonic()
    for repeat in range(a.repeats):
        for label, kind, count in jobs(counts):
            base = SCRATCH / f"multihost-{stamp}" / f"{label}-r{repeat}"
            base.mkdir(parents=True)
            load0, clock0 = loadavg(), clocks.now(None)
            records, error = launch(kind, count, base, a)
            job_clocks = clocks.spent(clock0, clocks.now(None))
            fsutil.remove(base)
            job = {"label": label, "count": count, "repeat": repeat, "records": records}
            job.update(loadavg_before=load0, loadavg_after=loadavg(), **job_clocks)
            if error:
                job["error"] = error
            run["jobs"].append(job)
            print(_brief(job), flush=True)
    fsutil.remove(SCRATCH / f"multihost-{stamp}")
    run["wall_s"] = time.monotonic() - t_start
    run["loadavg_end"] = loadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    json_path = OUT / f"multihost-{stamp}.json"
    machine.finish_run(run, json_path, results, render, source_may_change=not a.snapshot)


def _brief(job: dict[str, Any]) -> str:
    if "error" in job:
        return f"{job['label']} r{job['repeat']}: ERROR {job['error'][-600:]}"
    rs = job["records"]
    parts = []
    for op in ("save", "cold", "warm"):
        secs = max(r[op]["t1"] for r in rs) - min(r[op]["t0"] for r in rs)
        parts.append(f"{op} {secs:.3f} s")
    ok = all(r["cold_ok"] and r["warm_ok"] for r in rs)
    return f"{job['label']} r{job['repeat']}: " + ", ".join(parts) + ("" if ok else " MISMATCH")


if __name__ == "__main__":
    main()
