"""Bytes each process reads when it restores a checkpoint saved by another number of processes:
``python -m benchmarks.cross_topology``.

A state of ``--leaves`` float32 arrays (``--rows`` x 1024 each) is saved by N jax.distributed
processes (2 CPU devices each, every array sharded by rows over all devices) and restored by M
processes onto the same kind of sharding over their devices. Each restoring process counts the
bytes its reads went through (``/proc/self/io`` ``rchar``: page cache or not) beside its ideal
share (state / M); the excess is metadata and whole chunks at the edges of its rows
(``knobs.CHUNK_BYTES``: checksums cover whole chunks). Byte counts, not times: the machine need
not be quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks.multihost import OUT, check_loopback, free_port

WORKER = textwrap.dedent(
    """
    import json, os, sys, numpy as np, jax
    port, me, count, mode, path, leaves, rows = sys.argv[1:8]
    me, count, leaves, rows = int(me), int(count), int(leaves), int(rows)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=count, process_id=me,
                               coordinator_bind_address=f"127.0.0.1:{port}")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import stepsafe
    s = NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P("d"))
    def full(i):
        return (np.arange(rows * 1024, dtype=np.float32) + i).reshape(rows, 1024)
    if mode == "save":
        tree = {f"w{i}": jax.make_array_from_callback((rows, 1024), s, lambda x, i=i: full(i)[x])
                for i in range(leaves)}
        stepsafe.save(path, tree)
        print(json.dumps({"ok": True}))
    else:
        def rchar():
            with open("/proc/self/io") as f:
                return int(next(l for l in f if l.startswith("rchar")).split()[1])
        target = {f"w{i}": jax.ShapeDtypeStruct((rows, 1024), np.float32, sharding=s)
                  for i in range(leaves)}
        before = rchar()
        back = stepsafe.restore(path, target)
        read = rchar() - before
        ok = all(np.array_equal(np.asarray(sh.data), full(i)[sh.index])
                 for i in range(leaves) for sh in back[f"w{i}"].addressable_shards)
        print(json.dumps({"ok": ok, "read": read}))
    """
)


def job(count: int, mode: str, path: Path, leaves: int, rows: int) -> list[dict]:
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(port),
                str(i),
                str(count),
                mode,
                str(path),
                str(leaves),
                str(rows),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        if p.returncode:
            raise SystemExit(f"{mode} by {count} failed:\n{stderr[-3000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="4:2,4:1,1:4,2:4,2:2", help="saved:restored counts")
    parser.add_argument("--leaves", type=int, default=24)
    parser.add_argument("--rows", type=int, default=1024, help="rows of 1024 float32 per leaf")
    a = parser.parse_args()
    check_loopback()
    state = a.leaves * a.rows * 1024 * 4
    print(f"state: {a.leaves} arrays, {state / 1e6:.1f} MB\n")
    print("| saved by | restored by | read per process (MB) | ideal (MB) | read / ideal | exact |")
    print("|---|---|---|---|---|---|")
    for pair in a.pairs.split(","):
        n, m = (int(x) for x in pair.split(":"))
        path = OUT / "scratch" / f"cross-{n}-{m}"
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        job(n, "save", path, a.leaves, a.rows)
        got = job(m, "restore", path, a.leaves, a.rows)
        ideal = state / m
        reads = [r["read"] for r in got]
        print(
            f"| {n} | {m} | {', '.join(f'{r / 1e6:.2f}' for r in reads)} | {ideal / 1e6:.2f} | "
            f"{max(reads) / ideal:.3f} | {'yes' if all(r['ok'] for r in got) else 'NO'} |",
            flush=True,
        )
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
