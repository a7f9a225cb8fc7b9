"""Multi-tier checkpointing under jax.distributed (2 real processes on 127.0.0.1, each with a
local directory of its own): saves go to the local tier only, and the promoter writes the chosen
steps to the persistent tier, every process its part from its own local step, process 0
committing; the promoted steps restore bit-exact, and a resume takes the newest across tiers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax_processes
import numpy as np
import pytest

import stepsafe

jax = pytest.importorskip("jax")

SCRIPT = """
import json, logging, sys, numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stepsafe import CheckpointManager, ManagerOptions
root, phase = sys.argv[1], sys.argv[2]
me = jax.process_index()
logging.basicConfig(level=logging.INFO)
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
s = NamedSharding(mesh, P("data", "model"))
r = NamedSharding(mesh, P())

class Data:
    def __init__(self): self.pos = 0
    def get_state(self): return {"pos": self.pos, "process": me}
    def set_state(self, st): self.pos = st["pos"]; assert st["process"] == me, st

def state_at(step):
    w = np.arange(64, dtype=np.float32).reshape(8, 8) * step
    return {"w": jax.make_array_from_callback(w.shape, s, lambda i: w[i]),
            "b": jax.make_array_from_callback((8,), r, lambda i: np.full(8, step, np.float32)[i]),
            "n": step, "h": np.arange(3) + step}

options = ManagerOptions(
    save_interval_steps=100, local_directory=f"{root}/local_{me}/run",
    local_save_interval_steps=2, multi_tier=True, backup_interval_steps=4, async_save=True)
data = Data()
with CheckpointManager(f"{root}/persistent", options) as m:
    if phase == "train":
        for step in range(1, 10):
            data.pos = step * 10 + me
            m.save(step, state_at(step), data_iterator=data, force=step == 9)
        m.wait_until_finished()
        print("ok steps", json.dumps(m.all_steps()), json.dumps(m.local_steps()), flush=True)
    else:
        like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        target = {"w": like(state_at(1)["w"]), "b": like(state_at(1)["b"]), "n": 0,
                  "h": np.zeros(3, np.int64)}
        step, back = m.restore_newest(target, data_iterator=data)
        want = {"w": np.arange(64, dtype=np.float32).reshape(8, 8) * step,
                "b": np.full(8, step, np.float32)}
        for k in ("w", "b"):
            for sh in back[k].addressable_shards:
                assert np.array_equal(np.asarray(sh.data), want[k][sh.index]), k
        assert back["n"] == step and np.array_equal(back["h"], np.arange(3) + step), back
        assert data.pos == step * 10 + me, data.pos
        print("ok resumed", step, flush=True)
"""


def run(root: Path, phase: str) -> list[jax_processes.Result]:
    results = jax_processes.run(SCRIPT, 2, args=lambda i, port: [str(root), phase], timeout_s=180)
    everything = "\n".join(r.describe() for r in results)
    for r in results:
        assert r.returncode == 0 and r.stdout.count("ok ") == 1, everything
    return results


def test_promotion_writes_one_checkpoint_from_every_process_s_local_step(tmp_path: Path) -> None:
    results = run(tmp_path, "train")
    for r in results:
        # promoted: the first local step, then 4 steps on, then the forced last step
        assert r.stdout.strip() == "ok steps [2, 6, 9] [8, 9]", r.describe()
    for step in (2, 6, 9):
        path = tmp_path / "persistent" / str(step)
        assert stepsafe.verify(str(path)).ok
        record = json.loads((path / "_CHECKPOINT_METADATA").read_text())
        assert sorted(record["extra_files"]) == ["iter/process_0.json", "iter/process_1.json"]
        back = stepsafe.restore(str(path))  # one process here: whole arrays
        w = np.arange(64, dtype=np.float32).reshape(8, 8) * step
        np.testing.assert_array_equal(back["w"], w)
        np.testing.assert_array_equal(back["b"], np.full(8, step, np.float32))
        assert back["n"] == step
    for r in run(tmp_path, "resume"):
        assert r.stdout.strip() == "ok resumed 9", r.describe()
        # step 9 is in both tiers: read from the local disk, which is faster
        assert "Restored step 9 from the local tier" in r.stderr, r.describe()
        assert "the persistent tier's newest step too" in r.stderr, r.describe()
    shutil.rmtree(tmp_path / "local_1")  # process 1 lost its local disk
    for r in run(tmp_path, "resume"):
        assert r.stdout.strip() == "ok resumed 9", r.describe()
        assert "Restored step 9 from the persistent tier" in r.stderr, r.describe()
