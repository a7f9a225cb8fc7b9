"""One case in a fresh process: build or describe a state, time one operation, write JSON.

Run by ``benchmarks.run`` as
``python -m benchmarks.case METHOD STATE OP LOCATION RESULT [--storage S] [--variant V]``; a
fresh process per case keeps caches, allocators, connection pools and background threads of one
case out of the next. OP is ``save`` (durable save, or for async methods blocked + done),
``restore`` or ``memcpy``; LOCATION is a path on disk or a bucket URL (the environment already
points the clients at the server, ``benchmarks.storages``). Libraries are imported, the client
made and the state built before the clock starts.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import resource
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from benchmarks import fsutil, memory, states
from benchmarks.methods import REGISTRY, load
from benchmarks.methods.base import AsyncMethod, Method


def fingerprint(method: Method, tree: Any, state: str) -> str | None:
    """A hash of each leaf's first and last values: detects a wrong or missing round trip."""
    if not getattr(method, "fingerprint", True):
        return None
    h = hashlib.blake2b(digest_size=8)
    for spec in states.specs(state):
        flat = method.leaf(tree, spec.key).reshape(-1)
        h.update(flat[:4].tobytes() + flat[-4:].tobytes())
    return h.hexdigest()


def cpu_seconds() -> float:
    """User + system CPU of this process, all threads: with the server's (recorded by the
    runner) it tells which side of the connection a method keeps busy."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measured(op: Callable[[], Any], profile: str | None, out: dict[str, Any]) -> Any:
    """Run ``op`` with the peak RSS reset before it; put its seconds, CPU seconds and peak RSS
    over what the process held before into ``out``; return its result."""
    before = memory.rss()
    out["peak_reset"] = memory.reset_peak()
    prof = cProfile.Profile() if profile else None
    c0, t0 = cpu_seconds(), time.perf_counter()
    if prof:
        prof.enable()
    result = op()
    if prof:
        prof.disable()
    out["seconds"] = time.perf_counter() - t0
    out["cpu_s"] = cpu_seconds() - c0
    out["op_peak_bytes"] = memory.peak() - before
    if prof and profile:
        prof.dump_stats(profile)
    return result


def run_save(
    method: Method, state: str, location: str, storage: str, profile: str | None
) -> dict[str, Any]:
    tree = method.make(state)
    method.prepare(location, "save")
    out: dict[str, Any] = {}
    if isinstance(method, AsyncMethod):

        def save() -> None:
            t0 = time.perf_counter()
            wait = method.start(location, tree)
            out["blocked_s"] = time.perf_counter() - t0
            wait()

        measured(save, profile, out)
    else:
        measured(lambda: method.save(location, tree), profile, out)
    if storage == "disk":
        out["disk_bytes"], out["files"] = fsutil.disk_usage(location)
    out["fingerprint"] = fingerprint(method, tree, state)
    return out


def run_restore(method: Method, state: str, location: str, profile: str | None) -> dict[str, Any]:
    method.prepare(location, "restore")
    out: dict[str, Any] = {}
    tree = measured(lambda: method.restore(location, state), profile, out)
    # The state itself is the restore's output: only what lies above it is overhead.
    out["op_peak_bytes"] -= states.nbytes(state)
    out["fingerprint"] = fingerprint(method, tree, state)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("method", choices=sorted(REGISTRY))
    p.add_argument("state", choices=states.STATES)
    p.add_argument("op", choices=["save", "restore", "memcpy"])
    p.add_argument("location")
    p.add_argument("result")
    p.add_argument("--storage", default="disk")
    p.add_argument("--variant", help="one-object: how the bytes move; stepsafe: files-<N>M")
    p.add_argument("--profile", help="write cProfile stats of the timed operation here")
    a = p.parse_args()
    record: dict[str, Any] = {"method": a.method, "state": a.state, "op": a.op}
    try:
        method = load(a.method, a.storage, a.variant)
        if a.op == "save":
            record |= run_save(method, a.state, a.location, a.storage, a.profile)
        elif a.op == "restore":
            record |= run_restore(method, a.state, a.location, a.profile)
        else:
            record |= method.copy(a.state)
        method.close()
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
    record["maxrss_bytes"] = memory.maxrss()
    record["stepsafe_path"] = getattr(sys.modules.get("stepsafe"), "__file__", None)
    with open(a.result, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
