"""Saving under ``jax.distributed`` with 2 real processes is refused on every process.

Each process holds only its own shards of a sharded array; before the refusal, process 0
committed its half of the array and reported success. Until multi-host saves are built, every
process must fail with a clear error and nothing may be committed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import jax_processes
import pytest

pytest.importorskip("jax")

WORKER = textwrap.dedent(
    """
    import sys
    port, pid, out, loopback = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    import jax
    if not loopback:  # gloo would listen on the host's address: no CPU collectives at all
        jax.config.update("jax_cpu_collectives_implementation", None)
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        coordinator_bind_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=pid,
    )
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import stepsafe
    from stepsafe.manager.manager import CheckpointManager, ManagerOptions

    sharding = NamedSharding(Mesh(jax.devices(), ("d",)), P("d"))
    full = np.arange(32, dtype=np.float32).reshape(8, 4)
    x = jax.make_array_from_callback((8, 4), sharding, lambda idx: full[idx])
    assert jax.process_count() == 2 and not x.is_fully_addressable
    outcomes = []
    try:
        stepsafe.save(f"{out}/ckpt", {"w": x})
        outcomes.append("save: committed")
    except stepsafe.StepsafeError as e:
        outcomes.append(f"save: {type(e).__name__}: {e}")
    manager = CheckpointManager(f"{out}/run{pid}", ManagerOptions(save_interval_steps=1))
    try:
        manager.save(1, {"w": x})
        manager.wait_until_finished()
        outcomes.append("manager: committed")
    except stepsafe.StepsafeError as e:
        outcomes.append(f"manager: {type(e).__name__}: {e}")
    print("\\n".join(outcomes), flush=True)
    """
)


def test_save_from_two_jax_processes_is_refused_on_both_and_commits_nothing(tmp_path: Path):
    loopback = "1" if jax_processes.hostname_is_loopback() else "0"
    results = jax_processes.run(
        WORKER,
        args=lambda i, port: [str(port), str(i), str(tmp_path), loopback],
        initialize=False,  # the worker initialises, without gloo where the host is not loopback
    )
    for r in results:
        assert r.returncode == 0, r.describe()
        lines = r.stdout.splitlines()
        assert len(lines) == 2, r.describe()
        for line in lines:
            assert "MultiProcessSaveError" in line, line
            assert "multi-host saves are not supported yet" in line, line
            assert "2 JAX processes" in line, line
    assert not (tmp_path / "ckpt").exists()
    for run in ("run0", "run1"):
        leftovers = list((tmp_path / run).rglob("*")) if (tmp_path / run).exists() else []
        assert leftovers == [], leftovers


def test_the_process_check_never_imports_jax_for_numpy_users(tmp_path: Path):
    code = (
        "import sys, numpy as np, stepsafe\n"
        f"stepsafe.save({str(tmp_path / 'c')!r}, {{'a': np.arange(3)}})\n"
        "stepsafe.restore(" + repr(str(tmp_path / "c")) + ", {'a': np.zeros(3, np.int64)})\n"
        "assert 'jax' not in sys.modules, 'jax was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
