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
run's numbers. Checkpoints go under ``--dir`` and are deleted as the run goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import platform
import pstats
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import states
from benchmarks.fsutil import cold_method, evict, fsync_tree

Tree = dict[str, Any]


def now() -> float:
    return time.perf_counter()


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


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


def build_state(name: str, device: jax.Device) -> Tree:
    """The benchmark state with every array committed to ``device``."""
    tree = states.build(name, lambda a: jax.device_put(a, device))
    jax.block_until_ready(tree)
    return tree


def arrays_of(tree: Tree) -> Tree:
    return {k: v for k, v in tree.items() if k != "step"}


def host_copy(tree: Tree) -> Tree:
    """A numpy copy of the arrays, the reference a restore must match bit for bit. Taken from
    device-side copies: ``np.asarray`` on a live array caches its host value in the array, and
    a later save of that array would then read the cache instead of transferring."""
    copies = jax.tree.map(lambda x: x.copy(), arrays_of(tree))
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(copies))


def bit_exact(ref: Tree, got: Tree) -> tuple[bool, list[str]]:
    """Compare every array's bits (not values: NaNs and -0.0 count) and report mismatches."""
    bad: list[str] = []
    ref_leaves = jax.tree_util.tree_leaves_with_path(ref)
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    if [p for p, _ in ref_leaves] != [p for p, _ in got_leaves]:
        return False, ["tree structure differs"]
    for (path, a), (_, b) in zip(ref_leaves, got_leaves):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
            bad.append(jax.tree_util.keystr(path))
    return not bad, bad[:5]


def compiled_update(tree: Tree) -> Callable[[Tree], Tree]:
    """A jitted elementwise step that donates (and so overwrites) every input buffer. ``x + 1``
    changes every value for thousands of steps (a contraction such as ``0.5 * x + 1`` reaches
    its fixed point after a few dozen, and then the donation check proves nothing)."""

    def step(arrays: Tree) -> Tree:
        return jax.tree.map(lambda x: x + 1.0, arrays)

    return jax.jit(step, donate_argnums=0).lower(arrays_of(tree)).compile()


def run_update(update: Callable[[Tree], Tree], tree: Tree) -> tuple[Tree, float, bool]:
    """One donated step; returns the new tree, its seconds, and whether the inputs were donated."""
    old = jax.tree.leaves(arrays_of(tree))
    t0 = now()
    new = update(arrays_of(tree))
    jax.block_until_ready(new)
    dt = now() - t0
    donated = all(x.is_deleted() for x in old)
    return {**new, "step": tree["step"]}, dt, donated


def sharded_target(tree: Tree) -> Tree:
    """ShapeDtypeStructs carrying each array's sharding: restore straight onto the device."""
    out = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), arrays_of(tree)
    )
    out["step"] = 0
    return out


def limits(tree: Tree, scratch: Path) -> dict[str, Any]:
    """The machine's own limits for the same bytes: disk write + fdatasync of one buffer."""
    nbytes = sum(x.nbytes for x in jax.tree.leaves(arrays_of(tree)))
    block = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    path = scratch / "disk.bin"
    out: dict[str, Any] = {"nbytes": nbytes}
    for name in ("disk_write_fdatasync_s", "disk_write_fdatasync_again_s"):
        t0 = now()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        left = nbytes
        while left:
            left -= os.write(fd, memoryview(block)[: min(left, len(block))])
        os.fdatasync(fd)
        os.close(fd)
        out[name] = now() - t0
        path.unlink()
    return out


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``'s result, the seconds until it returned, and until its arrays were ready."""
    t0 = now()
    out = fn()
    returned = now() - t0
    jax.block_until_ready([x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)])
    return out, returned, now() - t0


def variants(tree: Tree, repeats: int) -> dict[str, Any]:
    """Other ways to do the two halves of an async save on the same leaves, to judge stepsafe's:
    the device-side copy the caller waits for (stepsafe: one ``jnp.array(copy=True)`` per
    shard on the I/O threads) and the device->host transfer the writer waits for (stepsafe: one
    blocking ``np.asarray`` per array, one after another, in ``format/writer.py:_plan``)."""
    from stepsafe.storage import run_all

    leaves = jax.tree.leaves(arrays_of(tree))
    device = leaves[0].devices().pop()
    jit_copy = jax.jit(lambda xs: [jnp.copy(x) for x in xs])
    copiers: dict[str, Callable[[], list[jax.Array]]] = {
        "jnp_array_per_leaf_8_threads": lambda: run_all(lambda x: jnp.array(x, copy=True), leaves),
        "jnp_array_per_leaf_serial": lambda: [jnp.array(x, copy=True) for x in leaves],
        "device_put_may_alias_false": lambda: jax.device_put(leaves, may_alias=False),
        "one_jit_copy": lambda: jit_copy(leaves),
    }
    out: dict[str, Any] = {"copy": {}, "to_host": {}}
    for name, fn in copiers.items():
        try:
            rows = [_timed(fn) for _ in range(repeats + 1)]
            got = rows[-1][0]
            distinct = all(
                g.unsafe_buffer_pointer() != x.unsafe_buffer_pointer() for g, x in zip(got, leaves)
            )
            out["copy"][name] = {
                "first_returned_s": rows[0][1],
                "later_returned_median_s": median([r[1] for r in rows[1:]]),
                "later_ready_median_s": median([r[2] for r in rows[1:]]),
                "distinct_buffers": distinct,
            }
            del got, rows
        except Exception as e:
            out["copy"][name] = {"error": repr(e)}

    def batched(cs: list[jax.Array]) -> list[np.ndarray]:
        for c in cs:
            c.copy_to_host_async()
        return [np.asarray(c) for c in cs]

    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    movers: dict[str, Callable[[list[jax.Array]], Any]] = {
        "asarray_serial": lambda cs: [np.asarray(c) for c in cs],
        "copy_to_host_async_then_asarray": batched,
        "device_get": jax.device_get,
        "device_put_pinned_host_then_asarray": lambda cs: [
            np.asarray(h) for h in jax.device_put(cs, pinned)
        ],
    }
    for name, fn in movers.items():
        try:
            times = []
            for _ in range(repeats + 1):
                cs = jit_copy(leaves)  # fresh copies: no host value cached in them yet
                jax.block_until_ready(cs)
                t0 = now()
                host = fn(cs)
                times.append(now() - t0)
                del cs, host
            out["to_host"][name] = {"first_s": times[0], "later_median_s": median(times[1:])}
        except Exception as e:
            out["to_host"][name] = {"error": repr(e)}
    return out


def device_bytes(device: jax.Device) -> int | None:
    stats = device.memory_stats() or {}
    return stats.get("bytes_in_use")


def profiled(fn: Callable[[], Any], lines: int = 18) -> tuple[Any, float, str]:
    """``fn()`` under cProfile: its result, seconds, and the top ``lines`` by cumulative time."""
    prof = cProfile.Profile()
    t0 = now()
    prof.enable()
    out = fn()
    prof.disable()
    dt = now() - t0
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(lines)
    return out, dt, text.getvalue()


def staging_check(tree: Tree, scratch: Path) -> dict[str, Any]:
    """What an async snapshot holds on this device (device copies or host arrays), what the
    copies cost in device memory and time, and where the background write spends its time."""
    from stepsafe.arrays import StagingBuffers
    from stepsafe.checkpoint import snapshot, write

    device = jax.tree.leaves(arrays_of(tree))[0].devices().pop()
    before = device_bytes(device)
    t0 = now()
    snap = snapshot(tree, copy=True, staging=StagingBuffers())
    snapshot_s = now() - t0
    copies = [d for a in snap.arrays for _, d in a.shards]
    jax.block_until_ready([d for d in copies if isinstance(d, jax.Array)])
    copies_ready_s = now() - t0
    after = device_bytes(device)
    kinds = sorted({f"{type(d).__module__}.{type(d).__name__}" for d in copies})
    platforms = sorted({d.devices().pop().platform for d in copies if isinstance(d, jax.Array)})
    path = scratch / "staging-check"
    _, write_s, profile = profiled(lambda: write(str(path), snap), 25)
    shutil.rmtree(path, ignore_errors=True)
    return {
        "snapshot_s": snapshot_s,
        "copies_ready_s": copies_ready_s,
        "shard_types": kinds,
        "shard_platforms": platforms,
        "device_bytes_before": before,
        "device_bytes_with_copies": after,
        "write_s": write_s,
        "write_profile": profile,
    }


def stepsafe_async(tree: Tree, scratch: Path, repeats: int) -> tuple[dict[str, Any], Tree]:
    """Saves through the run manager, each followed at once by a donated step that overwrites
    the state; the checkpoint must still hold the values at ``save`` time, bit for bit."""
    from stepsafe.manager.manager import CheckpointManager, ManagerOptions

    update = compiled_update(tree)
    tree, baseline_step_s, _ = run_update(update, tree)
    root = scratch / "stepsafe-async"
    mgr = CheckpointManager(
        str(root), ManagerOptions(async_save=True, save_interval_steps=1, max_to_keep=1)
    )
    rows = []
    for i in range(1, repeats + 2):
        ref = host_copy(tree)
        mgr.wait_until_finished()
        t0 = now()
        mgr.all_steps()  # save() lists the committed steps first; how long that takes alone
        list_s = now() - t0
        t0 = now()
        started = mgr.save(i, tree, force=True)
        blocked = now() - t0
        tree, step_s, donated = run_update(update, tree)  # clobbers the saved buffers
        t_wait = now()
        mgr.wait_until_finished()
        total = now() - t0
        restored = mgr.restore(i)
        ok, bad = bit_exact(ref, arrays_of(restored))
        changed = not bit_exact(ref, host_copy(tree))[0]
        rows.append(
            {
                "save": i,
                "started": started,
                "blocked_s": blocked,
                "list_steps_s": list_s,
                "step_after_save_s": step_s,
                "donated": donated,
                "wait_s": total - (t_wait - t0),
                "total_s": total,
                "manager_reported": mgr.last_save_seconds,
                "restored_bit_exact": ok,
                "mismatches": bad,
                "state_changed_by_step": changed,
            }
        )
        del restored, ref
    # One more save under cProfile, to show where the blocked time goes.
    mgr.wait_until_finished()
    _, _, profile = profiled(lambda: mgr.save(repeats + 2, tree, force=True))
    mgr.wait_until_finished()
    mgr.close()
    shutil.rmtree(root, ignore_errors=True)
    later = rows[1:]
    summary = {
        "first_blocked_s": rows[0]["blocked_s"],
        "first_total_s": rows[0]["total_s"],
        "later_blocked_median_s": median([r["blocked_s"] for r in later]),
        "later_blocked_max_s": max(r["blocked_s"] for r in later),
        "later_total_median_s": median([r["total_s"] for r in later]),
        "baseline_step_s": baseline_step_s,
        "step_after_save_median_s": median([r["step_after_save_s"] for r in later]),
        "all_bit_exact": all(r["restored_bit_exact"] for r in rows),
        "all_donated": all(r["donated"] for r in rows),
    }
    return {"summary": summary, "rows": rows, "profile": profile}, tree


def orbax_async(tree: Tree, scratch: Path, repeats: int) -> tuple[dict[str, Any], Tree]:
    """Orbax's async StandardCheckpointer on the same state, the same donated step after it."""
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.WARNING)
    update = compiled_update(tree)
    ckptr = ocp.StandardCheckpointer()
    rows = []
    for i in range(1, repeats + 2):
        path = (scratch / f"orbax-async-{i}").absolute()
        ref = host_copy(tree)
        t0 = now()
        ckptr.save(path, tree)
        blocked = now() - t0
        tree, step_s, donated = run_update(update, tree)
        ckptr.wait_until_finished()
        finished = now() - t0
        fsync_tree(path)
        durable = now() - t0
        restored = ckptr.restore(path, sharded_target(tree))
        ok, bad = bit_exact(ref, arrays_of(restored))
        changed = not bit_exact(ref, host_copy(tree))[0]
        rows.append(
            {
                "state_changed_by_step": changed,
                "save": i,
                "blocked_s": blocked,
                "step_after_save_s": step_s,
                "donated": donated,
                "finished_s": finished,
                "finished_fsynced_s": durable,
                "restored_bit_exact": ok,
                "mismatches": bad,
            }
        )
        del restored, ref
        shutil.rmtree(path, ignore_errors=True)
    ckptr.close()
    later = rows[1:]
    summary = {
        "first_blocked_s": rows[0]["blocked_s"],
        "first_finished_s": rows[0]["finished_s"],
        "later_blocked_median_s": median([r["blocked_s"] for r in later]),
        "later_finished_median_s": median([r["finished_s"] for r in later]),
        "later_finished_fsynced_median_s": median([r["finished_fsynced_s"] for r in later]),
        "step_after_save_median_s": median([r["step_after_save_s"] for r in later]),
        "all_bit_exact": all(r["restored_bit_exact"] for r in rows),
    }
    return {"summary": summary, "rows": rows}, tree


def timed_restore(fn: Callable[[], Tree]) -> tuple[Tree, float]:
    t0 = now()
    out = fn()
    jax.block_until_ready(out)
    return out, now() - t0


def on_device(tree: Tree, like: Tree) -> bool:
    """Every restored array is a jax.Array with the sharding of the array it restores."""
    got, want = jax.tree.leaves(arrays_of(tree)), jax.tree.leaves(arrays_of(like))
    return all(
        isinstance(g, jax.Array) and g.sharding == w.sharding
        for g, w in zip(got, want, strict=True)
    )


def sync_roundtrip(tree: Tree, scratch: Path, repeats: int, cold: str) -> dict[str, Any]:
    """Synchronous durable saves and restores onto the device (warm and cold page cache)."""
    import orbax.checkpoint as ocp

    import stepsafe

    ref = host_copy(tree)
    target = sharded_target(tree)
    orbax = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    libs: dict[str, tuple[Callable[[Path], None], Callable[[Path], Tree]]] = {
        "stepsafe": (
            lambda p: stepsafe.save(str(p), tree),
            lambda p: stepsafe.restore(str(p), target),
        ),
        "orbax": (
            lambda p: (orbax.save(p, args=ocp.args.StandardSave(tree)), fsync_tree(p)),
            lambda p: orbax.restore(p, args=ocp.args.StandardRestore(target)),
        ),
    }
    out: dict[str, Any] = {}
    for name, (save, restore) in libs.items():
        rows = []
        for i in range(repeats):
            path = (scratch / f"sync-{name}-{i}").absolute()
            t0 = now()
            save(path)
            save_s = now() - t0
            _, warm_s = timed_restore(lambda p=path, r=restore: r(p))
            evict(path, cold)
            got, cold_s = timed_restore(lambda p=path, r=restore: r(p))
            ok, bad = bit_exact(ref, arrays_of(got))
            rows.append(
                {
                    "save_s": save_s,
                    "restore_warm_s": warm_s,
                    "restore_cold_s": cold_s,
                    "bit_exact": ok,
                    "mismatches": bad,
                    "on_device_with_sharding": on_device(got, tree),
                }
            )
            del got
            shutil.rmtree(path, ignore_errors=True)
        out[name] = {
            "save_median_s": median([r["save_s"] for r in rows]),
            "restore_warm_median_s": median([r["restore_warm_s"] for r in rows]),
            "restore_cold_median_s": median([r["restore_cold_s"] for r in rows]),
            "all_bit_exact": all(r["bit_exact"] for r in rows),
            "all_on_device": all(r["on_device_with_sharding"] for r in rows),
            "rows": rows,
        }
    orbax.close()
    return out


def guarded(name: str, results: dict[str, Any], fn: Callable[[], Any]) -> Any:
    """Run one part; a failure is recorded with its traceback and the run goes on."""
    try:
        return fn()
    except Exception as e:
        results[name] = {"error": repr(e), "traceback": traceback.format_exc()}
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return None


def gil_probe(tree: Tree) -> dict[str, Any]:
    """Does a device->host transfer on another thread hold the GIL? The caller's Python stalls
    if it does: measure the longest gap between iterations of a pure-Python loop on this thread
    while another thread runs ``np.asarray`` on a device copy of the biggest array, and how
    long ``Thread.start`` takes to return to this thread meanwhile."""
    import threading

    big = max(jax.tree.leaves(arrays_of(tree)), key=lambda x: x.nbytes)
    out: dict[str, Any] = {"nbytes": big.nbytes, "rows": []}
    for _ in range(3):
        c = big.copy()
        jax.block_until_ready(c)
        done: list[float] = []

        def transfer(c: jax.Array = c, done: list[float] = done) -> None:
            t0 = now()
            np.asarray(c)
            done.append(now() - t0)

        th = threading.Thread(target=transfer)
        t0 = now()
        th.start()
        start_s = now() - t0
        last, gap = now(), 0.0
        while th.is_alive():
            sum(range(100))
            t = now()
            gap, last = max(gap, t - last), t
        th.join()
        out["rows"].append({"thread_start_s": start_s, "max_gap_s": gap, "transfer_s": done[0]})
    return out


def stall(tree: Tree, scratch: Path, repeats: int) -> tuple[dict[str, Any], Tree]:
    """What a training loop feels while a save runs in the background: donated steps run back
    to back from the moment ``save`` returns until the save is durable (Orbax's files fsynced
    after ``wait_until_finished``, as stepsafe fsyncs its own), against the same steps with no
    save running."""
    import threading

    import orbax.checkpoint as ocp

    from stepsafe.manager.manager import CheckpointManager, ManagerOptions

    update = compiled_update(tree)
    base = []
    for _ in range(30):
        tree, dt, _ = run_update(update, tree)
        base.append(dt)
    mgr = CheckpointManager(
        str(scratch / "stall-stepsafe"),
        ManagerOptions(async_save=True, save_interval_steps=1, max_to_keep=1),
    )
    ockptr = ocp.StandardCheckpointer()

    def orbax_path(i: int) -> Path:
        return (scratch / f"stall-orbax-{i}").absolute()

    libs: dict[str, tuple[Callable[[int, Tree], Any], Callable[[int], None]]] = {
        "stepsafe": (lambda i, t: mgr.save(i, t, force=True), lambda i: mgr.wait_until_finished()),
        "orbax": (
            lambda i, t: ockptr.save(orbax_path(i), t),
            lambda i: (ockptr.wait_until_finished(), fsync_tree(orbax_path(i))),
        ),
    }
    out: dict[str, Any] = {
        "baseline_step_median_s": median(base[5:]),
        "baseline_step_max_s": max(base[5:]),
    }
    for name, (save, wait) in libs.items():
        rows = []
        for i in range(1, repeats + 2):
            finished = threading.Event()
            t0 = now()
            save(i, tree)
            blocked = now() - t0
            waiter = threading.Thread(target=lambda w=wait, f=finished, i=i: (w(i), f.set()))
            waiter.start()
            steps = []
            while not finished.is_set():
                tree, dt, _ = run_update(update, tree)
                steps.append(dt)
            total = now() - t0
            waiter.join()
            rows.append(
                {
                    "blocked_s": blocked,
                    "total_s": total,
                    "steps": len(steps),
                    "step_median_s": median(steps),
                    "step_max_s": max(steps) if steps else None,
                }
            )
        later = rows[1:]
        out[name] = {
            "blocked_median_s": median([r["blocked_s"] for r in later]),
            "total_median_s": median([r["total_s"] for r in later]),
            "step_median_s": median([r["step_median_s"] for r in later]),
            "step_max_s": max(r["step_max_s"] for r in later),
            "rows": rows,
        }
    mgr.close()
    ockptr.close()
    return out, tree


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
