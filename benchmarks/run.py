"""Run every case, each in a fresh process, and write raw JSON plus ``RESULTS.md``.

Repeats go round the methods (repeat 1 of every method, then repeat 2, ...) so that the disk's
bursts and lulls spread over all of them instead of favouring whichever ran in a quiet minute.
Before each save, ``sync`` flushes what an earlier case left dirty; before each cold restore the
page cache is emptied; each checkpoint is deleted after its case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import fsutil, machine, report, states
from benchmarks.methods import ALL, REGISTRY

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
SCRATCH = OUT / "scratch"


def child(
    args: list[str],
    log: Any,
    timeout: float,
    *,
    module: str = "benchmarks.case",
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``module`` with ``args`` and a result path last in a fresh interpreter; the JSON
    record it wrote (with an ``error`` when it failed or timed out)."""
    with tempfile.NamedTemporaryFile(suffix=".json", dir=OUT, delete=False) as f:
        result = Path(f.name)
    cmd = [sys.executable, "-m", module, *args, str(result)]
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


def run_method(
    method: str, state: str, repeat: int, cold: str, log: Any, timeout: float
) -> list[dict[str, Any]]:
    """Every case of one method on one state: save (+ cold and warm restore), or memcpy."""
    kind = REGISTRY[method].kind
    base = {"method": method, "state": state, "repeat": repeat}
    if kind == "memcpy":
        return [base | {"phase": "memcpy"} | child([method, state, "memcpy", "-"], log, timeout)]
    path = str(SCRATCH / f"{state}-{method}-{repeat}")
    fsutil.remove(path)
    os.sync()
    saved = base | {"phase": "save"} | child([method, state, "save", path], log, timeout)
    records = [saved]
    if kind == "sync" and "error" not in saved:
        fsutil.evict(path, cold)
        records.append(
            base | {"phase": "cold"} | child([method, state, "restore", path], log, timeout)
        )
        fsutil.warm(path)
        records.append(
            base | {"phase": "warm"} | child([method, state, "restore", path], log, timeout)
        )
        for r in records[1:]:
            r["roundtrip_ok"] = r.get("fingerprint") == saved.get("fingerprint")
    fsutil.remove(path)
    os.sync()
    return records


def _brief(records: list[dict[str, Any]]) -> str:
    parts = []
    for r in records:
        if "error" in r:
            parts.append(f"{r['phase']} ERROR {r['error'][:120]}")
        elif r["phase"] == "memcpy":
            parts.append(f"fresh {r['fresh_s']:.3f}s pretouched {r['pretouched_s']:.3f}s")
        else:
            blocked = f" (blocked {r['blocked_s']:.3f}s)" if "blocked_s" in r else ""
            bad = "" if r.get("roundtrip_ok", True) else " ROUNDTRIP MISMATCH"
            parts.append(f"{r['phase']} {r['seconds']:.3f}s{blocked}{bad}")
    return ", ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--states", default="tiny,m95", help=f"comma list of {','.join(states.STATES)}")
    p.add_argument("--methods", default=",".join(ALL), help=f"comma list of {','.join(ALL)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900, help="seconds per case")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown output")
    a = p.parse_args()
    chosen_states = [s for s in a.states.split(",") if s]
    chosen = [m for m in a.methods.split(",") if m]
    for name in chosen:
        if name not in REGISTRY:
            p.error(f"unknown method {name!r}; known: {', '.join(ALL)}")
    for name in chosen_states:
        if name not in states.STATES:
            p.error(f"unknown state {name!r}; known: {', '.join(states.STATES)}")
    SCRATCH.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run: dict[str, Any] = {
        "started": stamp,
        "argv": sys.argv[1:],
        "repeats": a.repeats,
        "states": chosen_states,
        "methods": chosen,
        "cold_method": fsutil.cold_method(),
        "machine": machine.describe(str(SCRATCH)),
        "versions": machine.versions(),
        "stepsafe_source": machine.stepsafe_source(),
        "records": [],
    }
    json_path = OUT / f"run-{stamp}.json"
    t0 = time.perf_counter()
    with open(OUT / f"run-{stamp}.log", "w") as log:
        for state in chosen_states:
            for repeat in range(a.repeats):
                for method in chosen:
                    recs = run_method(method, state, repeat, run["cold_method"], log, a.timeout)
                    run["records"] += recs
                    json_path.write_text(json.dumps(run, indent=1))
                    print(
                        f"[{time.perf_counter() - t0:6.0f}s] {state} #{repeat + 1} {method}: "
                        f"{_brief(recs)}",
                        flush=True,
                    )
    run["elapsed_s"] = time.perf_counter() - t0
    rel = json_path.relative_to(ROOT)
    machine.finish_run(
        run, json_path, a.results, lambda r: report.render(r, rel), source_may_change=True
    )


if __name__ == "__main__":
    main()
