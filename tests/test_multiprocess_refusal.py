"""Saving under ``jax.distributed`` with 2 real processes is refused on every process.

Each process holds only its own shards of a sharded array; before the refusal, process 0
committed its half of the array and reported success. Until multi-host saves are built, every
process must fail with a clear error and nothing may be committed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_host() -> bool:
    """Whether this host's name resolves to a loopback address (where gloo listens)."""
    try:
        return socket.gethostbyname(socket.gethostname()).startswith("127.")
    except OSError:
        return False


def test_save_from_two_jax_processes_is_refused_on_both_and_commits_nothing(tmp_path: Path):
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    loopback = "1" if _loopback_host() else "0"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(port), str(i), str(tmp_path), loopback],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=60)
            outputs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rc, out, err in outputs:
        assert rc == 0, err[-3000:]
        lines = out.splitlines()
        assert len(lines) == 2, out + err[-3000:]
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
