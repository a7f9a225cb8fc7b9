"""The run manager under jax.distributed (real processes on 127.0.0.1): async saves with
donation, a data-iterator state per process, one decision on steps for the whole job, and a
step damaged where only one process reads it passed by on every process.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax_processes
import numpy as np
import pytest

import stepsafe

jax = pytest.importorskip("jax")

ASYNC = """
import json, sys, numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.experimental.multihost_utils import process_allgather
from stepsafe import CheckpointManager, ManagerOptions
out = sys.argv[1]
me = jax.process_index()
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
s = NamedSharding(mesh, P("data", "model"))
r = NamedSharding(mesh, P())

class Data:
    def __init__(self): self.pos = 0
    def get_state(self): return {"pos": self.pos, "process": me}
    def set_state(self, st): self.pos = st["pos"]; assert st["process"] == me, st

@jax.jit
def init():
    return {"w": jnp.arange(64, dtype=jnp.float32).reshape(8, 8), "b": jnp.ones(8, jnp.float32)}
state = jax.jit(init, out_shardings={"w": s, "b": r})()
step_fn = jax.jit(lambda st: {"w": st["w"] * 2 + 1, "b": st["b"] + 1}, donate_argnums=0,
                  out_shardings={"w": s, "b": r})
data = Data()
expected = {}
with CheckpointManager(out, ManagerOptions(save_interval_steps=1, async_save=True)) as m:
    for step in range(1, 4):
        state = step_fn(state)  # donates the buffers the previous async save captured
        data.pos = step * 10 + me
        expected[step] = {k: np.asarray(process_allgather(v, tiled=True)) for k, v in state.items()}
        m.save(step, state, data_iterator=data)
    m.wait_until_finished()
    assert m.all_steps() == [1, 2, 3], m.all_steps()
    for step in (3, 2):
        data = Data()
        like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        back = m.restore(step, jax.tree.map(like, state), data_iterator=data)
        assert data.pos == step * 10 + me, (step, data.pos)
        for k, v in back.items():
            for sh in v.addressable_shards:
                assert np.array_equal(np.asarray(sh.data), expected[step][k][sh.index]), (step, k)
print("ok async saves restored bit-exact with each process's iterator", flush=True)
"""


def test_async_saves_with_donation_and_a_data_iterator_per_process(tmp_path: Path) -> None:
    results = jax_processes.run(ASYNC, 2, args=lambda i, port: [str(tmp_path)], timeout_s=150)
    everything = "\n".join(r.describe() for r in results)
    for r in results:
        assert r.returncode == 0 and r.stdout.count("ok ") == 1, everything
    step = tmp_path / "3"
    record = json.loads((step / "_CHECKPOINT_METADATA").read_text())
    assert sorted(record["extra_files"]) == ["iter/process_0.json", "iter/process_1.json"]
    # one process cannot take over two processes' data positions
    with stepsafe.CheckpointManager(str(tmp_path), stepsafe.ManagerOptions()) as m:

        class Data:
            def get_state(self) -> dict:
                return {}

            def set_state(self, state: dict) -> None:
                raise AssertionError("must not be called")

        with pytest.raises(stepsafe.StepsafeError, match="2 process"):
            m.restore(3, data_iterator=Data())
        back = m.restore(3)  # without the iterator: fine
        np.testing.assert_array_equal(back["b"], np.full(8, 4, np.float32))


DAMAGED = """
import sys, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stepsafe import CheckpointManager, ManagerOptions
out, phase = sys.argv[1], sys.argv[2]
me = jax.process_index()
s = NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P("d"))
def tree(step):
    x = np.full((8, 4), step, np.float32)
    return {"w": jax.make_array_from_callback(x.shape, s, lambda i: x[i])}
with CheckpointManager(out, ManagerOptions(save_interval_steps=1)) as m:
    if phase == "save":
        m.save(1, tree(1)); m.save(2, tree(2))
        print("ok saved", flush=True)
    else:
        step, back = m.restore_newest({"w": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=s)})
        values = {float(np.asarray(sh.data).ravel()[0]) for sh in back["w"].addressable_shards}
        print(f"ok restored step {step} holding {sorted(values)}", flush=True)
"""


def test_a_step_damaged_in_one_process_s_shards_is_passed_by_on_every_process(
    tmp_path: Path,
) -> None:
    run = lambda phase: jax_processes.run(  # noqa: E731
        DAMAGED, 2, args=lambda i, port: [str(tmp_path), phase], timeout_s=120
    )
    for r in run("save"):
        assert r.returncode == 0, r.describe()
    # flip a byte of process 1's data file of step 2: only process 1 reads it back
    (data,) = (tmp_path / "2" / "items").glob("process_1.*.data")
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    results = run("restore")
    everything = "\n".join(r.describe() for r in results)
    for r in results:
        assert r.returncode == 0, everything
        assert r.stdout == "ok restored step 1 holding [1.0]\n", everything
    assert "damaged" in results[0].stderr and "damaged" in results[1].stderr, everything
    assert stepsafe.verify(str(tmp_path / "1")).ok and (tmp_path / "2").exists()  # kept
