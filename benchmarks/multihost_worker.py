"""One process of a multi-process benchmark job: build its share of the state, save, restore.

Run by ``benchmarks.multihost`` as ``python -m benchmarks.multihost_worker KIND DIR STATE SCALE
REPLICATED_MIB``. KIND is ``jax`` (one of N processes under jax.distributed, the variables
``MP_PORT``, ``MP_INDEX``, ``MP_COUNT`` say which), ``numpy`` (stepsafe in one process without
jax.distributed, numpy leaves) or ``raw`` (the same bytes into one file with write + fsync).
Each process prints one ``RESULT {json}`` line: clock stamps (``time.monotonic``, one clock for
every process of the machine, so that the launcher takes the job's time as the latest end minus
the earliest start), bytes written, bytes read (``/proc/self/io``), peak RSS.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import fsutil, memory, states

# Every first axis is kept divisible by this many devices: 4 processes x 2 devices.
DEVICES_MAX = 8


def scaled_specs(state: str, scale: float) -> list[states.Spec]:
    """``state``'s leaves with the first axis scaled by ``scale`` (a multiple of 8 rows, at least
    8), so that a scaled-down state keeps its leaf count and stays divisible by every device
    count the benchmark uses."""
    if scale == 1.0:
        return states.specs(state)
    out = []
    for s in states.specs(state):
        rows = max(DEVICES_MAX, round(s.shape[0] * scale / DEVICES_MAX) * DEVICES_MAX)
        out.append(states.Spec(s.key, (rows, *s.shape[1:])))
    return out


def values(leaf: int, start: int, shape: tuple[int, ...]) -> np.ndarray:
    """Random float32 values of one shard, a function of (leaf, first row): every process makes
    its own shards without generating the whole state."""
    return np.random.default_rng([leaf, start]).random(shape, dtype=np.float32)


def io_counters() -> dict[str, int]:
    """``rchar`` (bytes through read syscalls, page cache or not) and ``read_bytes`` (bytes the
    block layer fetched) of this process."""
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        name, value = line.split(":")
        out[name] = int(value)
    return out


def timed(op: Callable[[], Any], rec: dict[str, Any], name: str) -> Any:
    """Run ``op``; record its clock stamps, read bytes and peak RSS under ``name``."""
    before, io0 = memory.rss(), io_counters()
    memory.reset_peak()
    t0 = time.monotonic()
    result = op()
    t1 = time.monotonic()
    io1 = io_counters()
    rec[name] = {
        "t0": t0,
        "t1": t1,
        "rchar": io1["rchar"] - io0["rchar"],
        "read_bytes": io1["read_bytes"] - io0["read_bytes"],
        "peak_rss": memory.peak(),
        "peak_over_before": memory.peak() - before,
    }
    return result


def written_bytes(step: str, process: int | None) -> int:
    """Sizes of the data files of ``process`` (every process's when None) in ``step``/items."""
    pattern = "*.data" if process is None else f"process_{process}.*.data"
    return sum(p.stat().st_size for p in (Path(step) / "items").glob(pattern))


def run_jax(base: str, state: str, scale: float, replicated_mib: float) -> dict[str, Any]:
    """One process of N: the state sharded over every device of the job along its first axis
    (every m95 leaf's first axis divides by 8), saved, restored cold, restored warm."""
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    port, count = os.environ["MP_PORT"], int(os.environ["MP_COUNT"])
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        coordinator_bind_address=f"127.0.0.1:{port}",
        num_processes=count,
        process_id=int(os.environ["MP_INDEX"]),
    )
    import stepsafe
    from stepsafe.distributed import coordinator

    coord, me = coordinator(), jax.process_index()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    specs = scaled_specs(state, scale)

    def sharding(shape: tuple[int, ...]) -> NamedSharding:
        split = shape and shape[0] % mesh.size == 0
        return NamedSharding(mesh, P("data") if split else P())

    def make(i: int, spec: states.Spec) -> jax.Array:
        def shard(index: tuple[slice, ...]) -> np.ndarray:
            start = index[0].start or 0
            rows = (index[0].stop or spec.shape[0]) - start
            return values(i, start, (rows, *spec.shape[1:]))

        return jax.make_array_from_callback(spec.shape, sharding(spec.shape), shard)

    tree = states.nest([(s.key, make(i, s)) for i, s in enumerate(specs)])
    tree["step"] = states.STEP
    jax.block_until_ready(tree)
    target = states.nest(
        [
            (s.key, jax.ShapeDtypeStruct(s.shape, states.DTYPE, sharding=sharding(s.shape)))
            for s in specs
        ]
    )
    target["step"] = 0
    ideal = 0
    for s in specs:
        indices = sharding(s.shape).addressable_devices_indices_map(s.shape).values()
        unique = {tuple(sl.indices(d)[:2] for sl, d in zip(i, s.shape)) for i in indices}
        ideal += sum(states.DTYPE.itemsize * int(np.prod([b - a for a, b in u])) for u in unique)
    rec: dict[str, Any] = {"process": me, "count": count, "ideal_read": ideal}
    step, cold = f"{base}/step", fsutil.cold_method()
    rec["cold_method"] = cold

    def restore() -> Any:
        return jax.block_until_ready(stepsafe.restore(step, target))

    def check(back: Any) -> bool:
        ok = True
        for s in specs:
            got, want = _leaf(back, s.key), _leaf(tree, s.key)
            for g, w in zip(got.addressable_shards, want.addressable_shards, strict=True):
                ok = ok and np.array_equal(np.asarray(g.data), np.asarray(w.data))
        return ok

    coord.barrier("start")
    timed(lambda: stepsafe.save(step, tree), rec, "save")
    rec["written"] = written_bytes(step, me)
    coord.barrier("saved")
    if me == 0:
        fsutil.evict(step, cold)
    coord.barrier("evicted")
    back = timed(restore, rec, "cold")
    rec["cold_ok"] = check(back)
    del back
    coord.barrier("restored cold")
    if me == 0:
        fsutil.warm(step)
    coord.barrier("warmed")
    back = timed(restore, rec, "warm")
    rec["warm_ok"] = check(back)
    del back
    tree = None  # the restored copies and the state are gone before the next save
    if count > 1 and replicated_mib > 0:
        rec["replicated"] = _replicated(base, mesh, coord, me, replicated_mib)
    coord.barrier("done")
    return rec


def _replicated(base: str, mesh: Any, coord: Any, me: int, mib: float) -> dict[str, Any]:
    """A fully replicated array of ``mib`` MiB saved by every process: who writes what."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import stepsafe

    rows = max(DEVICES_MAX, int(mib * (1 << 20)) // 4096 // DEVICES_MAX * DEVICES_MAX)
    full = values(10_000, 0, (rows, 1024))
    array = jax.make_array_from_callback(full.shape, NamedSharding(mesh, P()), lambda i: full[i])
    jax.block_until_ready(array)
    rec: dict[str, Any] = {"nbytes": array.nbytes}
    step = f"{base}/replicated"
    coord.barrier("replicated start")
    timed(lambda: stepsafe.save(step, {"replicated": array}), rec, "save")
    rec["written"] = written_bytes(step, me)
    return rec


def _leaf(tree: Any, key: states.Key) -> Any:
    for part in key:
        tree = tree[part]
    return tree


def run_numpy(base: str, state: str, scale: float) -> dict[str, Any]:
    """stepsafe in one process without jax.distributed: numpy leaves, the same bytes."""
    import stepsafe
    from benchmarks.methods.stepsafe import Abstract

    specs = scaled_specs(state, scale)
    tree = states.nest([(s.key, values(i, 0, s.shape)) for i, s in enumerate(specs)])
    tree["step"] = states.STEP
    target = states.nest([(s.key, Abstract(s.shape, states.DTYPE)) for s in specs])
    target["step"] = 0
    total = sum(s.nbytes for s in specs)
    step, cold = f"{base}/step", fsutil.cold_method()
    rec: dict[str, Any] = {"process": 0, "count": 1, "ideal_read": total, "cold_method": cold}
    timed(lambda: stepsafe.save(step, tree), rec, "save")
    rec["written"] = written_bytes(step, None)
    fsutil.evict(step, cold)
    same = lambda back: all(  # noqa: E731
        np.array_equal(_leaf(back, s.key), _leaf(tree, s.key)) for s in specs
    )
    rec["cold_ok"] = same(timed(lambda: stepsafe.restore(step, target), rec, "cold"))
    fsutil.warm(step)
    rec["warm_ok"] = same(timed(lambda: stepsafe.restore(step, target), rec, "warm"))
    return rec


def run_raw(base: str, state: str, scale: float) -> dict[str, Any]:
    """The disk's speed for these bytes: every leaf into one file (write + fsync of the file and
    its directory), read back with ``readinto`` into fresh arrays."""
    specs = scaled_specs(state, scale)
    leaves = [values(i, 0, s.shape) for i, s in enumerate(specs)]
    total = sum(s.nbytes for s in specs)
    path, cold = f"{base}/raw.bin", fsutil.cold_method()
    rec: dict[str, Any] = {"process": 0, "count": 1, "ideal_read": total, "cold_method": cold}

    def save() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for leaf in leaves:
                view = memoryview(leaf.reshape(-1).view(np.uint8))
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsutil.fsync_path(base)

    def restore() -> list[np.ndarray]:
        out = []
        with open(path, "rb", buffering=0) as f:
            for s in specs:
                a = np.empty(s.shape, states.DTYPE)
                view = memoryview(a.reshape(-1).view(np.uint8))
                while view:
                    view = view[f.readinto(view) :]
                out.append(a)
        return out

    def same(back: list[np.ndarray]) -> bool:
        return all(np.array_equal(a, b) for a, b in zip(back, leaves, strict=True))

    timed(save, rec, "save")
    rec["written"] = os.path.getsize(path)
    fsutil.evict(path, cold)
    rec["cold_ok"] = same(timed(restore, rec, "cold"))
    fsutil.warm(path)
    rec["warm_ok"] = same(timed(restore, rec, "warm"))
    return rec


def main(argv: list[str]) -> None:
    kind, base, state, scale, replicated_mib = argv
    if kind == "jax":
        rec = run_jax(base, state, float(scale), float(replicated_mib))
    elif kind == "numpy":
        rec = run_numpy(base, state, float(scale))
    else:
        rec = run_raw(base, state, float(scale))
    rec["maxrss"] = memory.maxrss()
    print("RESULT " + json.dumps(rec), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
