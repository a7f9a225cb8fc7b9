"""Replica-parallel writes: under several JAX processes, the shards of an array that several
devices hold are split among those devices, so that every unique byte is written exactly once
in the whole job and the processes write about equal shares (Orbax's rule).

Real jax.distributed processes on 127.0.0.1 (tests/jax_processes.py), 2 CPU devices each. Each
process prints the boxes it would write for several shardings as JSON; the test checks that the
boxes of all processes tile every array exactly and that the bytes per process are balanced.
Each process checks that the data of each of its boxes is the global array's slice.
"""

from __future__ import annotations

import json
import math

import jax_processes
import numpy as np
import pytest

from stepsafe.format.manifest import Shard, check_exact_cover

pytest.importorskip("jax")

BOXES = """
import json, sys
import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stepsafe.arrays import StagingBuffers, to_host
from stepsafe.arrays.jax_arrays import host_shards

n = jax.device_count()
flat = Mesh(np.array(jax.devices()), ("d",))
grid = Mesh(np.array(jax.devices()).reshape(n // 2, 2), ("data", "model"))
cases = {
    "replicated": (flat, P(), (8, 4)),
    "data_parallel": (grid, P(None, "model"), (8, 4)),
    "model_parallel": (flat, P("d"), (8, 4)),
    "sharded_2d": (grid, P("data", "model"), (8, 4)),
    "second_axis": (flat, P(), (3, 8)),  # rows do not divide by r: split the columns
    "indivisible": (flat, P(), (3, 5)),  # no axis divides: replica 0 writes it whole
    "scalar": (flat, P(), ()),
    "empty": (flat, P(), (0, 4)),
    "big": (grid, P(None, "model"), (n * 2, 8192)),  # slices of 64 KiB over every replica
}
out = {}
for name, (mesh, spec, shape) in cases.items():
    g = (np.arange(int(np.prod(shape))) % 1000).astype(np.float32).reshape(shape)
    x = jax.device_put(g, NamedSharding(mesh, spec))
    mine = host_shards(x, name, copy=False)
    for box, data in mine:
        want = g[tuple(slice(lo, hi) for lo, hi in box)]
        assert np.array_equal(np.asarray(data), want), (name, box)
    # an async save's capture (copy=True) takes the same boxes, as views: JAX arrays are
    # immutable, so nothing is copied (stepsafe.arrays.jax_arrays.host_shards)
    copied = to_host(name, x, copy=True, staging=StagingBuffers()).shards
    assert [b for b, _ in copied] == [b for b, _ in mine], name
    for (box, data), (_, orig) in zip(copied, mine):
        assert np.array_equal(data, np.asarray(orig)) and not data.flags.writeable, name
    out[name] = {"shape": list(shape), "boxes": [[list(r) for r in b] for b, _ in mine]}
print("BOXES " + json.dumps(out), flush=True)
"""


def _run(count: int, min_bytes: int | None = 0) -> list[dict]:
    """Every process's boxes; ``min_bytes``: knobs.REPLICA_SLICE_MIN_BYTES (None: default)."""
    env = {} if min_bytes is None else {"STEPSAFE_REPLICA_SLICE_MIN_BYTES": str(min_bytes)}
    results = jax_processes.run(BOXES, count, timeout_s=120, env=env)
    everything = "\n".join(r.describe() for r in results)
    docs = []
    for r in results:
        assert r.returncode == 0, everything
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith("BOXES "))
        docs.append(json.loads(line[len("BOXES ") :]))
    return docs


def _check(docs: list[dict], balanced: set[str]) -> dict[str, list[int]]:
    """Every case's boxes over all processes: an exact cover of the array; the bytes per
    process, equal for the ``balanced`` cases. Returns the bytes per process of each case."""
    shares = {}
    for name, first in docs[0].items():
        shape = tuple(first["shape"])
        boxes = [tuple(map(tuple, b)) for d in docs for b in d[name]["boxes"]]
        check_exact_cover(name, shape, [Shard(b, ()) for b in boxes])
        if math.prod(shape):
            assert math.prod(shape) == sum(math.prod(hi - lo for lo, hi in b) for b in boxes)
        per_process = [
            sum(4 * math.prod(hi - lo for lo, hi in b) for b in d[name]["boxes"]) for d in docs
        ]
        shares[name] = per_process
        if name in balanced:
            assert len(set(per_process)) == 1, (name, per_process)
    print(json.dumps(shares))
    return shares


def test_two_processes_split_replicated_shards_and_tile_every_array() -> None:
    shares = _check(
        _run(2), {"replicated", "data_parallel", "model_parallel", "sharded_2d", "second_axis"}
    )
    assert shares["replicated"] == [64, 64]  # (8, 4) float32 over 4 replicas: 2 rows each
    assert shares["data_parallel"] == [64, 64]  # each column block: half its rows per replica
    assert shares["indivisible"] == [60, 0]  # no axis divides by 4: replica 0, whole
    assert shares["scalar"] == [4, 0] and shares["empty"] == [0, 0]
    assert shares["big"] == [131072, 131072]


def test_four_processes_split_replicated_shards_and_tile_every_array() -> None:
    shares = _check(_run(4), {"replicated", "data_parallel", "model_parallel", "sharded_2d", "big"})
    assert shares["replicated"] == [32] * 4  # 8 replicas of 8 rows: 1 row each
    assert shares["data_parallel"] == [32] * 4  # mesh (4, 2): 4 replicas per column block
    # (3, 8) over 8 replicas: the columns split, one per device
    assert shares["second_axis"] == [24] * 4


def test_slices_under_the_knobs_minimum_are_written_whole_by_replica_0() -> None:
    """By default (64 KiB) only the big array is split; tiny replicated arrays are written
    whole by the process holding replica 0, as without replica-parallel writes."""
    shares = _check(_run(2, min_bytes=None), {"model_parallel", "sharded_2d", "big"})
    assert shares["replicated"] == [128, 0] and shares["data_parallel"] == [128, 0]
    assert shares["big"] == [131072] * 2  # 2 column blocks of (8, 4096) float32, 2 replicas


def test_one_process_writes_each_distinct_shard_once_from_replica_0() -> None:
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from stepsafe.arrays.jax_arrays import host_shards

    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    g = np.arange(32, dtype=np.float32).reshape(8, 4)
    x = jax.device_put(g, NamedSharding(mesh, P(None, "model")))
    out = host_shards(x, "x", copy=False)
    assert sorted(b for b, _ in out) == [((0, 8), (0, 2)), ((0, 8), (2, 4))]
    for box, data in out:
        assert np.array_equal(data, g[tuple(slice(*r) for r in box)])
