"""A process that dies or lags in the middle of a multi-host save (real processes, real SIGKILL):
nothing is committed, the survivors raise a CoordinationError within the timeout, the earlier
step is intact, and the next start cleans the leftovers and resumes.

The moment of death is chosen by wrapping one function of the dying process (its data-file
writer, or its entry into the exchange of parts) with a SIGKILL of itself: everything else is
the real save.
"""

from __future__ import annotations

from pathlib import Path

import jax_processes
import pytest

import stepsafe

jax = pytest.importorskip("jax")

SAVE = """
import os, signal, sys, time, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import stepsafe
from stepsafe.errors import CoordinationError
out, victim, moment = sys.argv[1], int(sys.argv[2]), sys.argv[3]
me = jax.process_index()
mesh = Mesh(np.array(jax.devices()), ("d",))
x = np.arange(64, dtype=np.float32).reshape(16, 4)
tree = {"w": jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("d")), lambda i: x[i])}
if me == 1:
    time.sleep(2)  # a slow process: the others wait for it
stepsafe.save(f"{out}/1", tree)
print("ok step 1", flush=True)

def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)

if me == victim and moment == "write":
    import stepsafe.format.written as written
    written._write_file = die
if me == victim and moment == "exchange":
    from stepsafe.distributed import Coordinator
    real = Coordinator.gather
    Coordinator.gather = lambda self, name, *a, **k: (die() if name.endswith("-parts")
                                                      else real(self, name, *a, **k))
t0 = time.monotonic()
try:
    stepsafe.save(f"{out}/2", tree)
    print("saved?!", flush=True)
except CoordinationError as e:
    print(f"ok raised after {time.monotonic() - t0:.1f}s: {e}", flush=True)
os._exit(0)  # JAX's exit would wait for the dead process
"""

RESUME = """
import sys, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stepsafe import CheckpointManager, ManagerOptions
out = sys.argv[1]
mesh = Mesh(np.array(jax.devices()), ("d",))
s = NamedSharding(mesh, P("d"))
target = {"w": jax.ShapeDtypeStruct((16, 4), np.float32, sharding=s)}
with CheckpointManager(out, ManagerOptions(save_interval_steps=1)) as m:
    assert m.all_steps() == [1], m.all_steps()
    step, state = m.restore_newest(target)
    x = np.arange(64, dtype=np.float32).reshape(16, 4)
    for sh in state["w"].addressable_shards:
        assert np.array_equal(np.asarray(sh.data), x[sh.index])
    assert m.save(2, state)
    m.wait_until_finished()
    assert m.all_steps() == [1, 2], m.all_steps()
print("ok resumed", flush=True)
"""


@pytest.mark.parametrize(
    "victim,moment",
    [(1, "write"), (1, "exchange"), (0, "write")],
    ids=["p1-write", "p1-exchange", "p0-write"],
)
def test_a_process_killed_mid_save_commits_nothing_and_the_run_resumes(
    tmp_path: Path, victim: int, moment: str
) -> None:
    results = jax_processes.run(
        SAVE, 2, args=lambda i, port: [str(tmp_path), str(victim), moment],
        timeout_s=120, env={"STEPSAFE_COORDINATION_TIMEOUT_S": "5"},
    )  # fmt: skip
    everything = "\n".join(r.describe() for r in results)
    dead, survivor = results[victim], results[1 - victim]
    assert dead.returncode == -9 and dead.stdout.splitlines() == ["ok step 1"], everything
    lines = survivor.stdout.splitlines()
    assert lines[0] == "ok step 1", everything
    if victim == 0:
        # JAX aborts every process at once when process 0 (its coordinator) dies
        assert survivor.returncode in (-6, 134) or (len(lines) == 2 and "ok raised" in lines[1]), (
            everything
        )
    else:
        assert survivor.returncode == 0 and len(lines) == 2, everything
        seconds = float(lines[1].split()[3].rstrip("s:"))
        assert seconds < 60 and "did not answer" in lines[1], lines[1]  # 5 s, not JAX's 60
    # nothing committed at step 2, step 1 intact
    assert not (tmp_path / "2").exists(), sorted(p.name for p in tmp_path.iterdir())
    assert stepsafe.verify(str(tmp_path / "1")).ok
    # the next start cleans the leftovers (a dead process 0's temporary) and resumes
    resumed = jax_processes.run(RESUME, 2, args=lambda i, port: [str(tmp_path)], timeout_s=120)
    for r in resumed:
        assert r.returncode == 0 and r.stdout == "ok resumed\n", "\n".join(
            x.describe() for x in resumed
        )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["1", "2", "_LEASE"] or names == ["1", "2"], names
