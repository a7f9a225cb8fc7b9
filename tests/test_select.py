"""Partial restore reads only the selected subtree's bytes (counted by the kernel)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import stepsafe


def bytes_read_by_this_process() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.fixture
def state(tmp_path):
    rng = np.random.default_rng(0)
    params = {f"layer_{i}": rng.standard_normal((256, 256)).astype(np.float32) for i in range(4)}
    tree = {
        "params": params,
        "opt_state": {
            "mu": {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()},
            "nu": {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()},
        },
        "step": 12,
    }
    stepsafe.save(tmp_path / "c", tree, data_file_size_bytes=1 << 20)
    return tmp_path / "c", tree


def test_select_reads_only_selected_bytes(state):
    path, tree = state
    stepsafe.metadata(path)  # warm imports and the manifest path
    params_bytes = sum(v.nbytes for v in tree["params"].values())
    total = params_bytes * 3

    before = bytes_read_by_this_process()
    params = stepsafe.restore(path, select="params")
    selected_read = bytes_read_by_this_process() - before

    before = bytes_read_by_this_process()
    stepsafe.restore(path)
    full_read = bytes_read_by_this_process() - before

    for k, v in tree["params"].items():
        np.testing.assert_array_equal(params[k], v)
    assert full_read >= total
    assert params_bytes <= selected_read < params_bytes + (64 << 10), (selected_read, total)


def test_select_nested_key_sequence_and_target(state):
    path, tree = state
    mu0 = stepsafe.restore(path, select=("opt_state", "mu", "layer_0"))
    np.testing.assert_array_equal(mu0, tree["opt_state"]["mu"]["layer_0"])
    nu = stepsafe.restore(path, tree["opt_state"]["nu"], select="opt_state/nu")
    assert list(nu) == list(tree["opt_state"]["nu"])
    meta = stepsafe.metadata(path, select="opt_state")
    assert meta["mu"]["layer_1"].shape == (256, 256)


def test_stale_temporaries_are_recognised_and_removed(tmp_path):
    stepsafe.save(tmp_path / "1", {"a": np.ones(3)})
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_here = tmp_path / f"2.stepsafe-tmp-{socket.gethostname()}-{child.stdout.strip()}-ab12"
    alive_here = tmp_path / f"3.stepsafe-tmp-{socket.gethostname()}-{os.getpid()}-cd34"
    elsewhere = tmp_path / "4.stepsafe-tmp-otherhost-123-ef56"
    for d in (dead_here, alive_here, elsewhere):
        d.mkdir()
        (d / "junk").write_bytes(b"x")
    # a dead writer on this host is stale at once; others only once old enough
    assert stepsafe.storage.stale_temporaries(str(tmp_path)) == [str(dead_here)]
    assert stepsafe.storage.stale_temporaries(str(tmp_path), min_age_s=3600) == [str(dead_here)]
    with pytest.raises(stepsafe.IncompleteCheckpointError, match="never committed"):
        stepsafe.restore(dead_here)
    removed = stepsafe.storage.remove_stale_temporaries(str(tmp_path), min_age_s=1e-9)
    assert sorted(removed) == sorted(map(str, (dead_here, alive_here, elsewhere)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    assert stepsafe.restore(tmp_path)["a"].tolist() == [1, 1, 1]
