"""One bucket case in a fresh process: save or restore one state at one URL, write JSON.

Run by ``benchmarks.buckets`` as
``python -m benchmarks.bucket_case SERVER METHOD STATE OP URL RESULT [--variant V]``, with the
environment already isolated and pointed at the server (``bucket_servers``). A fresh process
per case keeps one case's connection pools, caches and threads out of the next, as in
``benchmarks.case``; libraries are imported and the state is built before the clock starts.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback
from typing import Any

from benchmarks import memory, states
from benchmarks.bucket_methods import load
from benchmarks.bucket_plan import METHODS
from benchmarks.bucket_servers import SERVERS
from benchmarks.case import fingerprint


def cpu_seconds() -> float:
    """User + system CPU of this process, all threads: with the server's (recorded by the
    runner) it tells which side of the connection a method keeps busy."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def prepare(method: Any, url: str, op: str) -> None:
    """The method's untimed set-up for this URL, if it has one (see bucket_methods)."""
    hook = getattr(method, "prepare", None)
    if hook is not None:
        hook(url, op)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("server", choices=SERVERS)
    p.add_argument("method", choices=METHODS)
    p.add_argument("state", choices=states.STATES)
    p.add_argument("op", choices=["save", "restore"])
    p.add_argument("url")
    p.add_argument("result")
    p.add_argument(
        "--variant", help="one-object: how the bytes move; stepsafe: files-<N>M (bucket_plan)"
    )
    a = p.parse_args()
    record: dict[str, Any] = {"server": a.server, "method": a.method, "op": a.op}
    try:
        method = load(a.method, a.server, a.variant)
        if a.op == "save":
            tree = method.make(a.state)
            prepare(method, a.url, a.op)
            before = memory.rss()
            memory.reset_peak()
            c0, t0 = cpu_seconds(), time.perf_counter()
            method.save(a.url, tree)
            record["seconds"] = time.perf_counter() - t0
            record["cpu_s"] = cpu_seconds() - c0
            record["op_peak_bytes"] = memory.peak() - before
        else:
            prepare(method, a.url, a.op)
            before = memory.rss()
            memory.reset_peak()
            c0, t0 = cpu_seconds(), time.perf_counter()
            tree = method.restore(a.url, a.state)
            record["seconds"] = time.perf_counter() - t0
            record["cpu_s"] = cpu_seconds() - c0
            record["op_peak_bytes"] = memory.peak() - before - states.nbytes(a.state)
        record["fingerprint"] = fingerprint(method, tree, a.state)
        method.close()
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
    record["maxrss_bytes"] = memory.maxrss()
    imported = sys.modules.get("stepsafe")
    record["stepsafe_path"] = getattr(imported, "__file__", None)
    with open(a.result, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
