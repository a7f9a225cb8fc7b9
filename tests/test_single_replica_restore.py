"""Single-replica restore with real jax.distributed processes on 127.0.0.1.

A checkpoint saved by this (single) process is restored by 2 and by 4 processes onto a mesh
("data", "model") whose data axis spans processes. Two measures that can fail show that the
processes outside replica 0 read no data byte: every process counts the bytes its storage (a
``LocalStorage`` subclass that counts what the real reads fill) reads, and the processes outside
replica 0 are given a copy of the checkpoint whose data files hold only zeros (same sizes), so a
single data byte read there would fail its checksum. Every shard is compared bit for bit.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import jax_processes
import numpy as np
import pytest

jax = pytest.importorskip("jax")
import ml_dtypes  # noqa: E402
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import stepsafe  # noqa: E402
from stepsafe.arrays.single_replica import SingleReplica  # noqa: E402
from stepsafe.errors import ConfigError, TargetMismatchError  # noqa: E402


def _values() -> dict:
    rng = np.random.default_rng(7)
    f = rng.standard_normal((8, 4)).astype(np.float32)
    f[0, 0] = -0.0
    f.view(np.uint32)[1, 1] = 0x7FC12345  # a NaN with a payload
    f.view(np.uint32)[2, 2] = 0xFFC00001  # a negative NaN
    h = np.array([-0.0, 1.5, np.nan, -2.0])
    h.view(np.uint64)[2] = 0x7FF8000000000ABC
    return {
        "f": f,
        "bf": rng.standard_normal((4, 8)).astype(ml_dtypes.bfloat16),
        "i": (np.arange(12, dtype=np.int32).reshape(3, 4) - 5) * 1000003,
        "mask": np.array([[True, False, True, True], [False, False, True, False]]),
        "host": h,
        "step": 42,
        "name": "run-a",
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """One checkpoint saved by this process from arrays sharded over its 4 CPU devices, the
    expected values pickled beside it, and a copy whose data files hold only zeros."""
    root = tmp_path_factory.mktemp("single_replica")
    values = _values()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
    tree = dict(values)
    tree["f"] = jax.device_put(values["f"], NamedSharding(mesh, P("a", "b")))
    tree["bf"] = jax.device_put(values["bf"], NamedSharding(mesh, P(None, "b")))
    tree["i"] = jax.device_put(values["i"], NamedSharding(mesh, P()))
    stepsafe.save(root / "ck", tree)
    (root / "want.pkl").write_bytes(pickle.dumps(values))
    shutil.copytree(root / "ck", root / "zeros")
    data = list((root / "zeros").rglob("*.data"))
    assert data
    for path in data:
        size = path.stat().st_size
        path.write_bytes(b"")
        with open(path, "r+b") as f:
            f.truncate(size)  # zeros, same size: any read of it fails its checksum
    return root


RESTORE = """
import json, pickle, sys
import jax, ml_dtypes, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stepsafe.arrays.single_replica import SingleReplica
from stepsafe.checkpoint.restore import open_checkpoint, restore_from
from stepsafe.errors import ChecksumMismatchError
from stepsafe.storage.base import ReadHandle
from stepsafe.storage.local import LocalStorage

root, model, axis, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
me, count = jax.process_index(), jax.process_count()

class Handle(ReadHandle):
    def __init__(self, storage, inner):
        self.storage, self.inner = storage, inner
    def read_into(self, offset, buf):
        self.inner.read_into(offset, buf)
        self.storage.data += memoryview(buf).nbytes
    def close(self):
        self.inner.close()

class Counting(LocalStorage):
    # the real local storage, counting the bytes its reads fill
    def __init__(self):
        self.data = self.meta = 0
    def open_read(self, path):
        return Handle(self, super().open_read(path))
    def read_into(self, path, offset, buf):
        super().read_into(path, offset, buf)
        self.data += memoryview(buf).nbytes
    def read_bytes(self, path, limit=None):
        got = super().read_bytes(path, limit)
        self.meta += len(got)
        return got

grid = np.array(jax.devices()).reshape(count * 2 // model, model)  # a row of processes: a replica
names = ("data", "model")
if axis == 1:  # the same replicas, the data axis second
    grid, names = grid.T, ("model", "data")
mesh = Mesh(grid, names)
primary = {d.process_index for d in np.take(mesh.devices, 0, axis=axis).flat}
options = SingleReplica(replica_axis_index=axis, memory_limit_bytes=limit or None)
S = lambda *spec: NamedSharding(mesh, P(*spec))
target = {
    "f": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=S(None, "model")),
    "bf": jax.ShapeDtypeStruct((4, 8), ml_dtypes.bfloat16, sharding=S(None, "model")),
    "i": jax.ShapeDtypeStruct((3, 4), np.int32, sharding=S()),
    "mask": jax.ShapeDtypeStruct((2, 4), np.bool_, sharding=S(None, "model")),
    "host": np.zeros(4, np.float64),
    "step": 0,
    "name": None,
}
if axis == 0:  # "i" on a second mesh, every device a replica: process 0 holds replica 0 and 1
    line = Mesh(np.array(jax.devices()), ("data",))
    target["i"] = jax.ShapeDtypeStruct((3, 4), np.int32, sharding=NamedSharding(line, P()))
want = pickle.load(open(f"{root}/want.pkl", "rb"))
path = f"{root}/ck" if me in primary else f"{root}/zeros"

storage = Counting()
with open_checkpoint(path, storage) as reader:
    total = sum(a.nbytes for a in reader.manifest.arrays.values())
    out = restore_from(reader, target, single_replica=options)

def same(a, b):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    bits = np.array_equal(a.view(np.uint8), b.view(np.uint8))
    return a.dtype == b.dtype and a.shape == b.shape and bits

for key in ("f", "bf", "i", "mask"):
    x = out[key]
    assert x.sharding == target[key].sharding, (key, x.sharding)
    assert x.addressable_shards, key
    for shard in x.addressable_shards:
        assert same(np.asarray(shard.data), want[key][shard.index]), (key, shard.index)
assert same(out["host"], want["host"]) and out["step"] == 42 and out["name"] == "run-a", out

loose = Counting()  # no target: every leaf is a host leaf, read by one process of replica 0
with open_checkpoint(path, loose) as reader:
    tree = restore_from(reader, None, single_replica=options)
assert sorted(tree) == sorted(want) and tree["step"] == 42 and tree["name"] == "run-a", tree
for key in ("f", "bf", "i", "mask", "host"):
    assert same(tree[key], want[key]), key
assert (loose.data > 0) == (me == min(primary)), (me, loose.data)

plain = Counting()  # the same restore without single-replica: the counter does see reads
with open_checkpoint(f"{root}/ck", plain) as reader:
    restore_from(reader, target)

corrupt = "ok"  # replica 0 reads a damaged chunk: every process raises, none hangs
try:
    with open_checkpoint(f"{root}/bad" if me in primary else f"{root}/zeros") as reader:
        restore_from(reader, target, single_replica=options)
except ChecksumMismatchError as e:
    corrupt = type(e).__name__
print("RESULT " + json.dumps({"me": me, "primary": me in primary, "data": storage.data,
      "meta": storage.meta, "plain": plain.data, "total": total, "corrupt": corrupt}))
"""


def _run(saved: Path, count: int, model: int, axis: int, limit: int) -> list[dict]:
    bad = saved / "bad"
    if not bad.exists():
        shutil.copytree(saved / "ck", bad)
        data = next(bad.rglob("*.data"))
        raw = bytearray(data.read_bytes())
        raw[3] ^= 0xFF  # one flipped byte in the first chunk
        data.write_bytes(bytes(raw))
    argv = [str(saved), str(model), str(axis), str(limit)]
    results = jax_processes.run(RESTORE, count, args=lambda i, port: argv, timeout_s=120)
    for r in results:
        assert r.returncode == 0, r.describe()
    got = [
        json.loads(line.split(" ", 1)[1])
        for r in results
        for line in r.stdout.splitlines()
        if line.startswith("RESULT ")
    ]
    for g in got:  # shown with pytest -s
        print(f"process {g['me']}: data bytes read {g['data']} (without single-replica "
              f"{g['plain']}, checkpoint {g['total']}), metadata {g['meta']}")  # fmt: skip
    return got


def test_two_processes_replica_0_reads_everything_the_other_nothing(saved):
    # mesh (2, 2): the data axis is the process; groups of at most 64 bytes per device (one
    # f shard): several collectives
    got = _run(saved, 2, 2, axis=0, limit=64)
    assert [g["primary"] for g in got] == [True, False]
    p0, p1 = got
    assert p0["data"] == p0["total"]  # the primary replica is all of process 0: every byte, once
    assert p1["data"] == 0 and p1["meta"] > 0  # metadata only
    assert p1["plain"] > 0  # without single-replica it reads
    assert [g["corrupt"] for g in got] == ["ChecksumMismatchError"] * 2


def test_four_processes_two_read_halves_two_read_nothing(saved):
    # mesh ("model", "data") of (4, 2), replica_axis_index=1: processes 0 and 1 hold replica 0;
    # one group (the default limit)
    got = _run(saved, 4, 4, axis=1, limit=0)
    assert [g["primary"] for g in got] == [True, True, False, False]
    assert all(g["data"] == 0 for g in got[2:]), got
    assert all(0 < g["data"] < g["total"] for g in got[:2]), got
    assert all(g["plain"] > 0 for g in got), got
    assert [g["corrupt"] for g in got] == ["ChecksumMismatchError"] * 4


# -- rules: each a clear error before anything is read (one process, 4 CPU devices) -----------


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))


def _target(sharding) -> dict:
    """The whole saved tree as a target, ``f`` onto ``sharding``, the rest onto the host."""
    target: dict = {k: None for k in _values()}
    target["f"] = jax.ShapeDtypeStruct((8, 4), np.float32, sharding=sharding)
    return target


def test_a_target_without_a_named_sharding_is_refused(saved):
    target = _target(SingleDeviceSharding(jax.devices()[0]))
    with pytest.raises(TargetMismatchError, match="needs a target with a NamedSharding"):
        stepsafe.restore(saved / "ck", target, single_replica=SingleReplica())


def test_the_replica_axis_in_the_partition_spec_is_refused(saved, mesh):
    target = _target(NamedSharding(mesh, P("data", "model")))
    with pytest.raises(TargetMismatchError, match=r"replica axis 'data'.*is in the target's"):
        stepsafe.restore(saved / "ck", target, single_replica=SingleReplica())
    with pytest.raises(TargetMismatchError, match="replica axis 'model'"):
        target = _target(NamedSharding(mesh, P(None, ("data", "model"))))
        stepsafe.restore(saved / "ck", target, single_replica=SingleReplica(1))


def test_an_axis_index_past_the_mesh_is_refused(saved, mesh):
    target = _target(NamedSharding(mesh, P()))
    with pytest.raises(TargetMismatchError, match=r"replica_axis_index=2.*'data', 'model'"):
        stepsafe.restore(saved / "ck", target, single_replica=SingleReplica(2))
    with pytest.raises(ConfigError, match="replica_axis_index"):
        SingleReplica(-1)
    with pytest.raises(ConfigError, match="memory_limit_bytes"):
        SingleReplica(memory_limit_bytes=0)


def test_one_process_restores_as_usual(saved, mesh):
    """Nothing to broadcast (every process holds replica 0): the same leaves as without it."""
    want = _values()
    target = _target(NamedSharding(mesh, P("model")))
    target["host"] = np.zeros(4)
    out = stepsafe.restore(saved / "ck", target, single_replica=SingleReplica())
    assert out["host"].view(np.uint64).tolist() == want["host"].view(np.uint64).tolist()
    for shard in out["f"].addressable_shards:
        got = np.asarray(shard.data)
        assert np.array_equal(got.view(np.uint8), want["f"][shard.index].view(np.uint8))
