"""One case in a fresh process: build or describe a state, time one operation, write JSON.

Run by ``benchmarks.run`` as ``python -m benchmarks.case METHOD STATE OP PATH RESULT``; a fresh
process per case keeps caches, allocators and background threads of one case out of the next.
OP is ``save`` (durable save, or for async methods blocked + done), ``restore`` or ``memcpy``.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import time
import traceback
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


def _timed(op: Any, profile: str | None) -> tuple[Any, float]:
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    out = op()
    if prof:
        prof.disable()
    elapsed = time.perf_counter() - t0
    if prof and profile:
        prof.dump_stats(profile)
    return out, elapsed


def run_save(method: Method, state: str, path: str, profile: str | None) -> dict[str, Any]:
    tree = method.make(state)
    before = memory.rss()
    out: dict[str, Any] = {"peak_reset": memory.reset_peak()}
    if isinstance(method, AsyncMethod):
        t0 = time.perf_counter()
        wait = method.start(path, tree)
        out["blocked_s"] = time.perf_counter() - t0
        wait()
        out["seconds"] = time.perf_counter() - t0
    else:
        _, out["seconds"] = _timed(lambda: method.save(path, tree), profile)
    out["op_peak_bytes"] = memory.peak() - before
    out["disk_bytes"], out["files"] = fsutil.disk_usage(path)
    out["fingerprint"] = fingerprint(method, tree, state)
    return out


def run_restore(method: Method, state: str, path: str, profile: str | None) -> dict[str, Any]:
    before = memory.rss()
    reset = memory.reset_peak()
    tree, seconds = _timed(lambda: method.restore(path, state), profile)
    peak = memory.peak()
    # The state itself is the restore's output: only what lies above it is overhead.
    return {
        "seconds": seconds,
        "peak_reset": reset,
        "op_peak_bytes": peak - before - states.nbytes(state),
        "fingerprint": fingerprint(method, tree, state),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("method", choices=sorted(REGISTRY))
    p.add_argument("state", choices=states.STATES)
    p.add_argument("op", choices=["save", "restore", "memcpy"])
    p.add_argument("path")
    p.add_argument("result")
    p.add_argument("--profile", help="write cProfile stats of the timed operation here")
    a = p.parse_args()
    record: dict[str, Any] = {"method": a.method, "state": a.state, "op": a.op}
    try:
        method = load(a.method)
        if a.op == "save":
            record |= run_save(method, a.state, a.path, a.profile)
        elif a.op == "restore":
            record |= run_restore(method, a.state, a.path, a.profile)
        else:
            record |= method.copy(a.state)
        method.close()
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
    record["maxrss_bytes"] = memory.maxrss()
    with open(a.result, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
