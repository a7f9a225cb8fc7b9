"""The scale model on stepsafe's own format version 2 (not a prototype): a job of P processes x
A arrays, each array of shape (64 P, 1024) float32 sharded by rows over all processes.

Measured: process 0's merge (``grid_parts.merge_grid_parts`` over every process's part as it
arrives: its data files and the cells it wrote), the top manifest's size, and one process's
restore planning on the same topology: parse the top manifest, load and check its own part
file, and plan the read of its rows of every array (``ArrayEntry.shards_over`` and
``regions.plan_array_read``), with the bytes of metadata it reads. Each phase is timed once
after a warm-up; run it on a quiet machine.

    .venv/bin/python -m benchmarks.scale_v2 --scales 10x1000,1000x10000
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from stepsafe import knobs
from stepsafe.format.grid_parts import grid_key, merge_grid_parts
from stepsafe.format.manifest import Chunk, Manifest
from stepsafe.format.parts import part_json
from stepsafe.format.plan import HostArray
from stepsafe.format.regions import plan_array_read
from stepsafe.format.written import WrittenPart

SAVE_ID = "0123456789ab"
ROWS, COLS = 64, 1024
SHARD = ROWS * COLS * 4


def _setup(processes: int, arrays: int) -> tuple[list, list[HostArray], str]:
    sharding = {"mesh": {"axis_names": ["d"], "shape": [processes]}, "spec": ["d"]}
    keys = [f"layer_{a:05d}" for a in range(arrays)]
    hosts = [HostArray(k, np.dtype(np.float32), (processes * ROWS, COLS), [], sharding)
             for k in keys]  # fmt: skip
    structure = ["dict", keys, [["leaf"]] * arrays]
    found = grid_key(hosts[0], knobs.REPLICA_SLICE_MIN_BYTES)
    assert found is not None
    return structure, hosts, found[0]


def _part_file(p: int, arrays: int) -> bytes:
    file = f"process_{p}.00000.{SAVE_ID}.data"
    tables = {
        f"layer_{a:05d}": [(p, (Chunk(file, a * SHARD, SHARD, f"{a:016x}"),))]
        for a in range(arrays)
    }
    return part_json(tables)


def measure(processes: int, arrays: int) -> dict[str, float]:
    structure, hosts, pattern = _setup(processes, arrays)
    mine = processes // 2
    part = _part_file(mine, arrays)
    parts = [
        WrittenPart(
            files={f"process_{p}.00000.{SAVE_ID}.data": arrays * SHARD},
            part_file=[f"part_{p}.{SAVE_ID}.json", len(part), "0" * 16],
            cells={pattern: [p]},
        )
        for p in range(processes)
    ]
    from stepsafe.format.checksum import checksum

    parts[mine].part_file = [f"part_{mine}.{SAVE_ID}.json", len(part), checksum(part)]
    t0 = time.perf_counter()
    raw = merge_grid_parts(structure, hosts, {}, parts, SAVE_ID)
    merge_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = Manifest.from_json(raw, "manifest")
    manifest.parts.read = lambda name, limit: part
    parse_s = time.perf_counter() - t0
    box = ((mine * ROWS, (mine + 1) * ROWS), (0, COLS))
    t0 = time.perf_counter()
    for key, entry in manifest.arrays.items():
        shards = entry.shards_over([box])
        plan_array_read(key, entry, [box], shards)
    plan_s = time.perf_counter() - t0
    return {
        "merge_s": merge_s,
        "manifest_bytes": len(raw),
        "parse_s": parse_s,
        "plan_s": plan_s,
        "read_bytes": len(raw) + len(part),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="10x1000,100x1000,1000x1000,1000x10000")
    args = parser.parse_args()
    print("| P x A | merge on process 0 | top manifest | one process: parse / plan | "
          "metadata it reads | peak RSS |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for scale in args.scales.split(","):
        p, a = (int(x) for x in scale.split("x"))
        measure(min(p, 4), min(a, 10))  # warm-up: imports, first calls
        r = measure(p, a)
        print(
            f"| {p}x{a} | {r['merge_s']:.3f} s | {r['manifest_bytes'] / 1e6:.2f} MB | "
            f"{r['parse_s']:.3f} / {r['plan_s']:.3f} s | {r['read_bytes'] / 1e6:.2f} MB | "
            f"{r['peak_rss_mb']:.0f} MB |",
            flush=True,
        )
    print(json.dumps({"note": "times from one run each; see the module docstring"}))


if __name__ == "__main__":
    main()
