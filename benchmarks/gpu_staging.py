"""Device-to-host staging on a real accelerator: stepsafe's async save against Orbax's.

Why this exists: the CPU benchmark (``benchmarks/run``) cannot show what an async save costs a
training loop on a GPU. There, ``stepsafe.arrays.jax_arrays.host_shards`` copies every shard on
the device (dispatched asynchronously) and the writer thread brings the copies to host later, so
``CheckpointManager.save`` should block for little more than the dispatch, and the caller may
donate its buffers the moment ``save`` returns. This script measures that on the device the
state lives on, checks that donation right after ``save`` leaves the checkpoint bit-exact, and
puts Orbax's async save and both libraries' restores onto the device beside it, in one process.

    cd .gpu && PYTHONPATH=src:. python -m benchmarks.gpu_staging --state m95 --dir /tmp/ckpt

It prints one JSON document (and writes it to ``--json``); ``benchmarks/RESULTS-gpu.md`` holds a
run's numbers. Checkpoints go under ``--dir`` and are deleted as the run goes. Each part (the
``--parts`` names) lives in ``benchmarks/gpu/``; this module only runs them in order.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

from benchmarks import states
from benchmarks.fsutil import cold_method
from benchmarks.gpu.async_saves import orbax_async, stepsafe_async
from benchmarks.gpu.common import build_state, now
from benchmarks.gpu.probes import gil_probe, limits
from benchmarks.gpu.staging import staging_check, variants
from benchmarks.gpu.stall import stall
from benchmarks.gpu.sync import sync_roundtrip


def environment(device: jax.Device) -> dict[str, Any]:
    """What the numbers were taken on: device, driver-visible memory, package versions."""
    versions = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "orbax-checkpoint", "tensorstore", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    commit = Path(__file__).with_name("COMMIT")
    mem = {}
    for line in Path("/proc/meminfo").read_text().splitlines()[:3]:
        key, value = line.split(":", 1)
        mem[key] = value.strip()
    return {
        "device": str(device),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "meminfo": mem,
        "versions": versions,
        "stepsafe_commit": commit.read_text().strip() if commit.exists() else None,
        "disk": shutil.disk_usage("/tmp")._asdict(),
    }


def guarded(name: str, results: dict[str, Any], fn: Callable[[], Any]) -> Any:
    """Run one part; a failure is recorded with its traceback and the run goes on."""
    try:
        return fn()
    except Exception as e:
        results[name] = {"error": repr(e), "traceback": traceback.format_exc()}
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state", default="m95", choices=states.STATES)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/ckpt")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--parts", default="stepsafe_async,staging,variants,limits,orbax_async,sync,gil,stall"
    )
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    scratch = Path(args.dir)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    device = jax.devices()[0]
    cold = cold_method()
    results: dict[str, Any] = {
        "env": environment(device),
        "state": args.state,
        "state_nbytes": states.nbytes(args.state),
        "leaves": len(states.specs(args.state)),
        "repeats": args.repeats,
        "cold_method": cold,
    }
    t0 = now()
    tree = build_state(args.state, device)
    results["build_s"] = now() - t0
    print(f"state built on {device} in {results['build_s']:.1f} s", file=sys.stderr, flush=True)
    for name in parts:
        if name in ("stepsafe_async", "orbax_async", "stall"):
            fn = {"stepsafe_async": stepsafe_async, "orbax_async": orbax_async}.get(name, stall)
            got = guarded(name, results, lambda f=fn, t=tree: f(t, scratch, args.repeats))
            if got is not None:
                results[name], tree = got
            else:  # a failed part may have donated the state away: build it again
                tree = build_state(args.state, device)
        elif name in ("staging", "variants", "limits", "gil"):
            call = {
                "staging": lambda t=tree: staging_check(t, scratch),
                "limits": lambda t=tree: limits(t, scratch),
                "variants": lambda t=tree: variants(t, args.repeats),
                "gil": lambda t=tree: gil_probe(t),
            }[name]
            got = guarded(name, results, call)
            if got is not None:
                results[name] = got
        elif name != "sync":
            raise SystemExit(f"unknown part {name!r}")
        print(f"{name} done", file=sys.stderr, flush=True)
    if "sync" in parts:
        got = guarded("sync", results, lambda: sync_roundtrip(tree, scratch, args.repeats, cold))
        if got is not None:
            results["sync"] = got
    results["device_memory_stats"] = device.memory_stats()
    text = json.dumps(results, indent=1, default=str)
    if args.json:
        Path(args.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
