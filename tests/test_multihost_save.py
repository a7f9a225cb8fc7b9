"""Saves and restores under jax.distributed with real processes on 127.0.0.1: every process
writes its own shards, process 0 commits one checkpoint, every process learns the outcome.

Each test starts 2 or 4 processes (tests/jax_processes.py, 2 CPU devices each); the scripts
print ``ok``-lines and the tests assert on every process's output and on what is on storage.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax_processes
import numpy as np
import pytest
from conftest import BUCKET_KINDS

import stepsafe

jax = pytest.importorskip("jax")

# A mesh over every device of the job: ("data", "model") = (processes, 2).
TREE = """
import sys, json, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import stepsafe
me, count = jax.process_index(), jax.process_count()
mesh = Mesh(np.array(jax.devices()).reshape(count, 2), ("data", "model"))
def full(seed, shape=(8, 16), dtype=np.float32):
    return (np.arange(np.prod(shape)) * 7 + seed).astype(dtype).reshape(shape)
SPECS = {"dp": P("data"), "mp": P(None, "model"), "both": P("data", "model"), "rep": P(),
         "dp_rep": P(None, None)}
def global_array(key, spec):
    x = full(len(key))
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])
def make_tree():
    tree = {k: global_array(k, s) for k, s in SPECS.items()}
    tree["host"] = np.full(3, 10 + me, np.int32)  # host-local: process 0's is saved
    tree["step"] = 100 + me
    tree["name"] = f"process {me}"
    return tree
def target(spec_mesh=None):
    m = spec_mesh or mesh
    t = {k: jax.ShapeDtypeStruct((8, 16), np.float32, sharding=NamedSharding(m, s))
         for k, s in SPECS.items()}
    t.update(host=np.zeros(3, np.int32), step=0, name="")
    return t
def check(back, label):
    for k in SPECS:
        want = full(len(k))
        for s in back[k].addressable_shards:
            got = np.asarray(s.data).view(np.uint8)
            assert np.array_equal(got, want[s.index].view(np.uint8)), (label, k, s.index)
    assert back["host"].tolist() == [10, 10, 10] and back["step"] == 100, back
    assert back["name"] == "process 0", back["name"]
    print(f"ok {label}", flush=True)
"""


def _run(script: str, count: int, *args: str, **kw) -> list[jax_processes.Result]:
    return jax_processes.run(TREE + script, count, args=lambda i, port: list(args), **kw)


def _assert_all_ok(results: list[jax_processes.Result], oks: int) -> None:
    everything = "\n".join(r.describe() for r in reversed(results))
    for r in results:
        assert r.returncode == 0, everything
        assert r.stdout.count("ok ") == oks, everything


ROUND_TRIP = """
out = sys.argv[1]
stepsafe.save(f"{out}/1", make_tree(), custom_metadata={"by": "all"})
check(stepsafe.restore(f"{out}/1", target()), "round trip")
"""


@pytest.mark.parametrize("bucket_url", BUCKET_KINDS[1:], indirect=True)
def test_two_processes_save_one_checkpoint_on_a_bucket_and_restore_it(bucket_url: str) -> None:
    _assert_all_ok(_run(ROUND_TRIP, 2, bucket_url, timeout_s=120), 1)
    info = stepsafe.info(f"{bucket_url}/1")
    assert info.custom_metadata == {"by": "all"}
    assert stepsafe.verify(f"{bucket_url}/1").ok


def test_two_processes_save_one_checkpoint_that_restores_anywhere(tmp_path: Path) -> None:
    _assert_all_ok(_run(ROUND_TRIP, 2, str(tmp_path), timeout_s=120), 1)
    step = tmp_path / "1"
    # one checkpoint: both processes' data files under one save id, no temporaries left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    files = sorted(p.name for p in (step / "items").iterdir())
    ids = {f.split(".")[-2] for f in files}
    assert len(ids) == 1, files
    assert [f.split(".")[0] for f in files if f.endswith(".data")] == ["process_0", "process_1"]
    assert stepsafe.verify(str(step)).ok
    # a single process (numpy, no JAX devices involved) reads the whole of every array
    back = stepsafe.restore(str(step))
    for k in ("dp", "mp", "both", "rep", "dp_rep"):
        want = (np.arange(128) * 7 + len(k)).astype(np.float32).reshape(8, 16)
        np.testing.assert_array_equal(back[k], want)
    assert back["host"].tolist() == [10, 10, 10] and back["step"] == 100
    # each unique byte written once: the data files hold each array's bytes exactly once
    manifest = json.loads(next((step / "items").glob("manifest.*.json")).read_text())
    data = sum(size for size in manifest["files"].values())
    assert data >= 5 * 8 * 16 * 4 + 12 and data < 2 * (5 * 8 * 16 * 4), manifest["files"]
    # many processes write format version 2: the mesh's arrays on grids, described once, their
    # chunks in one part file per process; the host array keeps its shards in the manifest
    assert manifest["format_version"] == 2
    assert {k for k, a in manifest["arrays"].items() if "grid" in a} == SHARDED
    assert "shards" in manifest["arrays"]["host"]
    assert [p[0].split(".")[0] for p in manifest["parts"]] == ["part_0", "part_1"]
    written: dict[str, int] = {}
    for name, *_ in manifest["parts"]:
        part = json.loads((step / "items" / name).read_text())
        assert set(part["arrays"]) <= SHARDED
        for rows in part["arrays"].values():
            for _, chunks in rows:
                for chunk in chunks:
                    who = chunk[0].split(".")[0]
                    written[who] = written.get(who, 0) + chunk[2]
    # every byte once; arrays this small are not split among replicas (under
    # knobs.REPLICA_SLICE_MIN_BYTES), so process 0 writes the replicated ones whole
    assert written == {"process_0": 4 * 512, "process_1": 2 * 256}, written


SHARDED = {"dp", "mp", "both", "rep", "dp_rep"}


CROSS = """
src, mode = sys.argv[1], sys.argv[2]
if mode == "save":
    stepsafe.save(src, make_tree())
    print("ok saved", flush=True)
else:  # restore onto this job's mesh, and onto a reshaped one (model axis over all devices)
    check(stepsafe.restore(src, target()), "restored")
    flat = Mesh(np.array(jax.devices()).reshape(1, 2 * count), ("data", "model"))
    check(stepsafe.restore(src, target(flat)), "reshaped")
"""


def test_saved_by_4_processes_restored_by_2_and_by_1(tmp_path: Path) -> None:
    src = str(tmp_path / "4")
    _assert_all_ok(_run(CROSS, 4, src, "save", timeout_s=180), 1)
    _assert_all_ok(_run(CROSS, 2, src, "restore", timeout_s=120), 2)
    back = stepsafe.restore(src)  # one process, no JAX target
    np.testing.assert_array_equal(
        back["both"], (np.arange(128) * 7 + 4).astype(np.float32).reshape(8, 16)
    )


def test_saved_by_1_process_restored_by_4(tmp_path: Path) -> None:
    src = str(tmp_path / "1")
    tree = {k: (np.arange(128) * 7 + len(k)).astype(np.float32).reshape(8, 16)
            for k in ("dp", "mp", "both", "rep", "dp_rep")}  # fmt: skip
    tree.update(host=np.full(3, 10, np.int32), step=100, name="process 0")
    stepsafe.save(src, tree)
    _assert_all_ok(_run(CROSS, 4, src, "restore", timeout_s=180), 2)


FAILS = """
out = sys.argv[1]
# the processes disagree on the path: every process raises, nothing is committed
try:
    stepsafe.save(f"{out}/{1 + me}", make_tree())
    print("saved?!", flush=True)
except stepsafe.StepsafeError as e:
    print(f"ok refused {type(e).__name__}: {e}", flush=True)
# process 0 cannot open the save (the step exists): the same error type on every process
stepsafe.save(f"{out}/2", {"w": global_array("w", P("data"))})
try:
    stepsafe.save(f"{out}/2", make_tree())
    print("saved?!", flush=True)
except stepsafe.CheckpointExistsError as e:
    print(f"ok exists {e}", flush=True)
# process 1 fails while writing its part (an unsafe extra file name): all raise its error
from stepsafe.checkpoint.save import snapshot, write
try:
    write(f"{out}/3", snapshot(make_tree()), extra_files={"../x" if me == 1 else "fine": b"1"})
    print("saved?!", flush=True)
except stepsafe.StepsafeError as e:
    print(f"ok part failed {type(e).__name__}: {e}", flush=True)
"""


def test_a_failure_on_any_process_is_raised_on_every_process_and_commits_nothing(
    tmp_path: Path,
) -> None:
    results = _run(FAILS, 2, str(tmp_path), timeout_s=120)
    _assert_all_ok(results, 3)
    for r in results:
        refused, exists, part = r.stdout.splitlines()
        assert "every process must save the same step to the same path" in refused, refused
        assert "process 0 of 2 (CheckpointExistsError)" in exists or r.index == 0, exists
        assert ("ManifestError" in part and "process 1" in part) or r.index == 1, part
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2"]  # no temporaries, no steps 1, 3
