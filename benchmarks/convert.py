"""Conversions (issue #15) against the disk's copy speed:
``.venv/bin/python benchmarks/convert.py --snapshot`` (or ``python -m benchmarks.convert``).

The source is a training checkpoint of ``--state`` (l4g: ~4 GB) with MaxText's layout: its
per-layer weights stacked under ``params/decoder/layers`` along axis 1 (``[emb, L, ..]``,
MaxText's ``param_scan_axis``), Adam's ``mu`` and ``nu`` alike. ``states.py``'s states keep
``layer_00`` .. apart, which has nothing to unstack: the same leaves, stacked, are the same
bytes in fewer, larger arrays. Saved once with ``stepsafe.save``; then, ``--repeats`` times,
each case in a fresh process with the page cache dropped before it (``fsutil``):

1. ``copy-user`` / ``copy-kernel``: every file of the source read once and written once to a
   new file, fsynced (user space: ``readinto`` + ``write`` through a 16 MiB buffer, the path
   a converter's bytes take; kernel: ``sendfile``, no copy through user space). The faster
   median is the copy baseline: reading plus writing the bytes once.
2. ``param-only``: ``convert_checkpoint(param_only=True, unstack=True, scan_axis=1)``.
3. ``unstack``: the whole state, ``convert_checkpoint(unstack=True, scan_axis=1)``.
4. ``param-only-stacked``: ``convert_checkpoint(param_only=True)``, nothing unstacked: the
   reader and writer alone, to tell their cost from the unstacking's.

Each case: seconds to committed (fsync included, as any save), its peak RSS over the process
after imports (Linux's peak reset), its CPU seconds, and the machine's load. Conversions are
checked once: the layers unstacked, the optimizer state dropped or kept, a slice bit for bit.

Results: ``RESULTS-convert.md`` (``report/convert.py``); raw JSON under ``out/``.
"""

# ruff: noqa: E402
# (imports follow the fix of sys.path below)
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __name__ == "__main__" and Path(sys.path[0]).resolve() == HERE:
    # Run as a script: import ``benchmarks`` as a package; its modules must not shadow the
    # standard library's (benchmarks/profile.py would hide ``profile``).
    sys.path[0] = str(HERE.parent)

import argparse
import json
import os
import resource
import subprocess
import time
from collections import defaultdict
from typing import Any

import numpy as np

from benchmarks import clocks, fsutil, machine, memory, states

OUT = HERE / "out"
PACKAGES = ("stepsafe", "numpy", "ml_dtypes", "xxhash")
AXIS = 1  # MaxText's param_scan_axis
CASES = ("copy-user", "copy-kernel", "param-only", "unstack", "param-only-stacked")
BUFFER = 16 << 20


def stacked_specs(state: str) -> list[states.Spec]:
    """``state``'s leaves with each ``layer_<i>`` weight stacked on axis 1 under
    ``params/decoder/layers`` (and the same under ``opt_state/mu`` and ``nu``): MaxText's
    scanned layout, the same bytes as ``state``."""
    out: dict[states.Key, tuple[int, ...]] = {}
    layers: dict[states.Key, list[tuple[int, ...]]] = defaultdict(list)
    for spec in states.specs(state):
        top, *rest = spec.key
        prefix = (top, *rest[:1]) if top == "opt_state" else (top,)
        inner = spec.key[len(prefix) :]
        if inner[0].startswith("layer_"):
            layers[(*prefix, "decoder", "layers", *inner[1:])].append(spec.shape)
            out.setdefault((*prefix, "decoder", "layers", *inner[1:]), ())
        elif inner[0] == "embed":
            out[(*prefix, "token_embedder", *inner[1:])] = spec.shape
        else:
            out[(*prefix, "decoder", *inner)] = spec.shape
    for key, shapes in layers.items():
        first = shapes[0]
        out[key] = (*first[:AXIS], len(shapes), *first[AXIS:])
    return [states.Spec(k, s) for k, s in out.items()]


def build_source(state: str, path: Path) -> dict[str, Any]:
    """Save the stacked training state at ``path``; its shapes, for the report."""
    import stepsafe

    specs = stacked_specs(state)
    rng = np.random.default_rng(0)
    tree = states.nest([(s.key, rng.random(s.shape, dtype=np.float32)) for s in specs])
    tree["step"] = states.STEP
    t0 = time.perf_counter()
    stepsafe.save(str(path), tree)
    secs = time.perf_counter() - t0
    del tree
    nbytes, files = fsutil.disk_usage(path)
    largest = max(specs, key=lambda s: s.nbytes)
    params = sum(s.nbytes for s in specs if s.key[0] == "params")
    return {
        "arrays": len(specs), "array_bytes": sum(s.nbytes for s in specs),
        "params_bytes": params, "largest": ["/".join(largest.key), list(largest.shape)],
        "largest_bytes": largest.nbytes, "on_disk": nbytes, "files": files, "save_s": secs,
        "layers_shapes": {"/".join(s.key): list(s.shape) for s in specs
                          if s.key[0] == "params" and "layers" in s.key},
    }  # fmt: skip


# ---- one case, in a fresh process ----------------------------------------------------------


def _copy_user(src: Path, dst: Path) -> int:
    buf = bytearray(BUFFER)
    view, total = memoryview(buf), 0
    for f in fsutil.files_under(src):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "rb", buffering=0) as r, open(out, "xb", buffering=0) as w:
            while n := r.readinto(buf):
                chunk = view[:n]
                while chunk:
                    chunk = chunk[w.write(chunk) :]
                total += n
            os.fsync(w.fileno())
    return total


def _copy_kernel(src: Path, dst: Path) -> int:
    total = 0
    for f in fsutil.files_under(src):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "rb", buffering=0) as r, open(out, "xb", buffering=0) as w:
            size, done = os.fstat(r.fileno()).st_size, 0
            while done < size:
                done += os.sendfile(w.fileno(), r.fileno(), done, min(size - done, 1 << 30))
            os.fsync(w.fileno())
        total += size
    return total


def _dirs_synced(dst: Path) -> None:
    for root, _dirs, _files in os.walk(dst, topdown=False):
        fsutil.fsync_path(root)
    fsutil.fsync_path(dst.parent)


def run_case(case: str, src: Path, dst: Path) -> dict[str, Any]:
    """One case, timed alone: imports done, peak reset, then the copy or the conversion."""
    from stepsafe.convert import convert_checkpoint

    before = memory.rss()
    reset = memory.reset_peak()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if case.startswith("copy"):
        nbytes = (_copy_user if case == "copy-user" else _copy_kernel)(src, dst)
        _dirs_synced(dst)
        info: dict[str, Any] = {"bytes": nbytes}
    else:
        unstack = not case.endswith("stacked")
        done = convert_checkpoint(
            str(src), str(dst), param_only=case.startswith("param-only"), unstack=unstack,
            scan_axis=AXIS,
        )  # fmt: skip
        info = {"bytes": done.nbytes, "layer_sets": done.layer_sets, "step": done.step}
    secs = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    rec = {"case": case, "seconds": secs, "cpu_s": cpu, "rss_before": before, **info}
    rec |= {"peak_rise": memory.peak() - before, "peak_reset": reset, "ru_maxrss": memory.maxrss()}
    rec["on_disk"], rec["files"] = fsutil.disk_usage(dst)
    return rec


def check(case: str, src: Path, dst: Path) -> dict[str, Any]:
    """The conversion did what it says: layers unstacked, optimizer state dropped (param-only)
    or kept, one layer's slice equal bit for bit to the source's stacked array."""
    from stepsafe.checkpoint.restore import open_checkpoint

    a, b = open_checkpoint(str(src)), open_checkpoint(str(dst))
    keys = set(b.manifest.arrays)
    stacked = next(k for k in a.manifest.arrays if k.startswith("params") and "layers/" in k)
    expect = a.read_array(stacked)
    if case.endswith("stacked"):
        sliced = stacked
    else:
        sliced, expect = stacked.replace("/layers/", "/layers_3/"), np.take(expect, 3, axis=AXIS)
    same = bool(np.array_equal(expect, b.read_array(sliced)))
    return {
        "arrays_out": len(keys),
        "layers_left": sum("/layers/" in k for k in keys),
        "opt_state_out": sum(k.startswith("opt_state") for k in keys),
        "checked": sliced,
        "slice_bit_exact": same,
        "step_out": b.record.step,
    }


def child(a: argparse.Namespace) -> None:
    rec = run_case(a.case, Path(a.src), Path(a.dst))
    if a.check and not a.case.startswith("copy"):
        rec |= check(a.case, Path(a.src), Path(a.dst))
    Path(a.json).write_text(json.dumps(rec))


# ---- the orchestrator -------------------------------------------------------------------------


def one(a: argparse.Namespace, case: str, repeat: int, src: Path, cold: str) -> dict[str, Any]:
    dst = a.scratch / f"out-{case}"
    fsutil.remove(dst)
    fsutil.evict(src, cold)
    out = a.scratch / "case.json"
    cmd = [sys.executable, "-m", "benchmarks.convert", "--case", case, "--src", str(src),
           "--dst", str(dst), "--json", str(out)] + (["--check"] * (repeat == 0))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [os.environ.get("PYTHONPATH"), str(HERE.parent)]))}  # fmt: skip
    load = os.getloadavg()[0]
    c0 = clocks.now(None)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    spent = clocks.spent(c0, clocks.now(None))
    if p.returncode:
        rec = {"case": case, "error": (p.stderr or p.stdout)[-1500:]}
    else:
        rec = json.loads(out.read_text())
    rec |= {"repeat": repeat, "load1": load, **spent}
    fsutil.remove(dst)
    return rec


def _brief(rec: dict[str, Any]) -> str:
    if "error" in rec:
        return f"r{rec['repeat']} {rec['case']}: ERROR {rec['error']}"
    return (
        f"r{rec['repeat']} {rec['case']}: {rec['seconds']:.2f} s, "
        f"{rec['bytes'] / rec['seconds'] / 1e9:.2f} GB/s, peak rise "
        f"{rec['peak_rise'] / 2**20:.0f} MiB, load {rec['load1']:.1f}"
        + (f", bit-exact {rec['slice_bit_exact']}" if "slice_bit_exact" in rec else "")
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/convert.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--state", default="l4g", help="a state of benchmarks/states.py")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES), help="of " + ", ".join(CASES))
    p.add_argument("--snapshot", action="store_true",
                   help="measure stepsafe as committed at HEAD, not the working tree")  # fmt: skip
    p.add_argument("--results", default=None,
                   help="markdown (default: RESULTS-convert.md for an l4g run)")  # fmt: skip
    # one case (the orchestrator's children)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--dst", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.case:
        return child(a)
    from benchmarks.report.convert import render

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    results = a.results or str(
        HERE / "RESULTS-convert.md" if a.state == "l4g" else OUT / f"convert-{stamp}.md"
    )
    a.scratch = OUT / "scratch" / f"convert-{stamp}"
    a.scratch.mkdir(parents=True)
    run: dict[str, Any] = {
        "stamp": stamp,
        "command": "benchmarks/convert.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "state": a.state, "repeats": a.repeats, "axis": AXIS,
        "machine": machine.describe(str(OUT)), "versions": machine.versions(PACKAGES),
        "stepsafe_source": machine.snapshot_head(OUT) if a.snapshot else machine.stepsafe_source(),
        "load_at_start": os.getloadavg(), "records": [],
    }  # fmt: skip
    t0 = time.monotonic()
    try:
        src = a.scratch / "src" / str(states.STEP)
        run["source"] = build_source(a.state, src)
        run["cold"] = cold = fsutil.cold_method()
        print(f"source: {run['source']['on_disk'] / 1e9:.2f} GB on disk, saved in "
              f"{run['source']['save_s']:.1f} s; cold: {cold}", flush=True)  # fmt: skip
        for r in range(a.repeats):
            for case in a.cases.split(","):
                run["records"].append(one(a, case, r, src, cold))
                print(_brief(run["records"][-1]), flush=True)
    finally:
        fsutil.remove(a.scratch)
    run["wall_s"] = time.monotonic() - t0
    run["load_at_end"] = os.getloadavg()
    machine.finish_run(run, OUT / f"convert-{stamp}.json", results, render,
                       source_may_change=not a.snapshot)  # fmt: skip


if __name__ == "__main__":
    main()
