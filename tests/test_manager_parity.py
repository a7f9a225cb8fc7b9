"""What Orbax users expect of a manager: metrics stored with a step, retention by metric
(``best_fn``/``best_mode``), ``keep_period``, ``delete``, ``metadata``, ``restore(select=)``,
and ``stepsafe ls`` showing the metrics. Single process; real files."""

from __future__ import annotations

import json
import math

import jax_processes
import numpy as np
import pytest

import stepsafe
from stepsafe.cli.main import main
from stepsafe.errors import (
    CheckpointNotFoundError,
    ConfigError,
    DeletionError,
    ManifestError,
    UnsupportedLeafError,
)
from stepsafe.format.checksum import checksum
from stepsafe.format.layout import CommitRecord
from stepsafe.manager import CheckpointManager, ManagerOptions, run_checkpoint_dir


def state_at(step: int) -> dict:
    return {"step": step, "params": {"w": np.full((4, 3), step, np.float32)}, "b": np.ones(2)}


def manager(directory, **options) -> CheckpointManager:
    options = {"save_interval_steps": 1, "async_save": False, **options}
    return CheckpointManager(str(directory), ManagerOptions(**options))


def record(directory, step: int) -> dict:
    return json.loads((directory / str(step) / "_CHECKPOINT_METADATA").read_text())


def test_metrics_round_trip_and_a_record_without_them_is_unchanged(tmp_path):
    with manager(tmp_path, async_save=True) as m:
        m.save(1, state_at(1), metrics={"loss": np.float32(1.25), "acc": 1})
        m.save(2, state_at(2))
    assert record(tmp_path, 1)["metrics"] == {"loss": 1.25, "acc": 1}
    assert record(tmp_path, 2)["metrics"] == {}
    raw = (tmp_path / "1" / "_CHECKPOINT_METADATA").read_bytes()
    assert CommitRecord.from_json(raw, "x").metrics == {"loss": 1.25, "acc": 1}
    plain = CommitRecord(step=2, save_id="abcdef012345", init_timestamp_nsecs=5)
    assert plain.to_json() == CommitRecord.from_json(plain.to_json(), "x").to_json()
    assert b'"metrics": {}' in plain.to_json()


def test_bad_metrics_are_refused_in_the_callers_thread(tmp_path):
    with manager(tmp_path, async_save=True) as m:
        for bad in ({"loss": math.nan}, {"loss": "low"}, {1: 2.0}, [1.0], {"ok": True}):
            with pytest.raises(UnsupportedLeafError, match="metrics"):
                m.save(1, state_at(1), metrics=bad)
        assert m.all_steps() == []


def test_a_record_with_bad_metrics_is_refused_on_read(tmp_path):
    doc = json.loads(CommitRecord(step=1).to_json())
    del doc["checksum"]
    doc["metrics"] = {"loss": "x"}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    doc["checksum"] = checksum(canonical)  # a consistent record: only its metrics are wrong
    with pytest.raises(ManifestError, match="bad metrics"):
        CommitRecord.from_json(json.dumps(doc).encode(), "x")


@pytest.mark.parametrize(
    "mode, losses, kept",
    [
        # steps 1..6; best 2 by loss plus the latest (6)
        ("min", [5.0, 1.0, 4.0, 0.5, 3.0, 9.0], [2, 4, 6]),
        ("max", [5.0, 1.0, 4.0, 0.5, 3.0, 9.0], [1, 6]),  # 6 is best and latest
        ("max", [5.0, 1.0, 4.0, 0.5, 3.0, 0.1], [1, 3, 6]),
    ],
)
def test_best_fn_keeps_the_best_and_the_latest(tmp_path, mode, losses, kept):
    with manager(tmp_path, max_to_keep=2, best_fn=lambda m: m["loss"], best_mode=mode) as m:
        for step, loss in enumerate(losses, start=1):
            m.save(step, state_at(step), metrics={"loss": loss})
        assert m.all_steps() == kept


def test_steps_without_metrics_count_as_worst(tmp_path):
    with manager(tmp_path, max_to_keep=2, best_fn=lambda m: m["loss"], best_mode="min") as m:
        m.save(1, state_at(1), metrics={"loss": 9.0})
        m.save(2, state_at(2))  # no metrics
        m.save(3, state_at(3), metrics={"loss": 5.0})
        m.save(4, state_at(4), metrics={"acc": 1.0})  # best_fn raises KeyError: worst
        m.save(5, state_at(5), metrics={"loss": 7.0})
        assert m.all_steps() == [3, 5]


def test_keep_period_steps_are_never_deleted(tmp_path):
    with manager(tmp_path, max_to_keep=2, keep_period=3) as m:
        for step in range(1, 9):
            m.save(step, state_at(step))
        assert m.all_steps() == [3, 6, 7, 8]


def test_bad_retention_options_are_refused():
    with pytest.raises(ConfigError, match="best_mode"):
        ManagerOptions(best_mode="lowest")
    with pytest.raises(ConfigError, match="keep_period"):
        ManagerOptions(keep_period=0)
    with pytest.raises(ConfigError, match="best_fn"):
        ManagerOptions(best_fn="loss")


def test_delete_a_committed_step_and_refuse_others(tmp_path):
    with manager(tmp_path) as m:
        for step in (1, 2, 3):
            m.save(step, state_at(step))
        m.delete(2)
        assert m.all_steps() == [1, 3] and not (tmp_path / "2").exists()
        with pytest.raises(CheckpointNotFoundError, match="step 7"):
            m.delete(7)
        (tmp_path / "3" / "README").write_text("mine")
        with pytest.raises(DeletionError, match="did not write"):
            m.delete(3)
        (tmp_path / "5").mkdir()
        (tmp_path / "5" / "notes.txt").write_text("another tool's")
        with pytest.raises(DeletionError, match="not a committed"):
            m.delete(5)
        assert (tmp_path / "3" / "README").exists() and (tmp_path / "5" / "notes.txt").exists()
    reader = manager(tmp_path, enable_checkpointing=False)
    with pytest.raises(DeletionError, match="only reads"):
        reader.delete(1)
    assert (tmp_path / "1" / "_CHECKPOINT_METADATA").exists()


def test_metadata_of_a_step(tmp_path):
    with manager(tmp_path) as m:
        m.save(4, state_at(4))
        tree = m.metadata(4)
        assert tree["params"]["w"].shape == (4, 3) and tree["params"]["w"].dtype == np.float32
        assert m.metadata(4, select="params")["w"].shape == (4, 3)
        with pytest.raises(CheckpointNotFoundError):
            m.metadata(5)


def test_restore_with_select(tmp_path):
    with manager(tmp_path) as m:
        m.save(4, state_at(4))
        part = m.restore(4, select="params")
        np.testing.assert_array_equal(part["w"], np.full((4, 3), 4, np.float32))
        assert "b" not in part
        with pytest.raises(ConfigError, match="needs a step"):
            m.restore(select="params")


def test_ls_shows_metrics(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with manager(run_checkpoint_dir(str(tmp_path), "run1")) as m:
        m.save(1, state_at(1), metrics={"loss": 1.234567})
        m.save(2, state_at(2))
    assert main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Metrics" in out and "loss=1.235" in out
    assert main(["ls", str(tmp_path), "--json"]) == 0
    steps = json.loads(capsys.readouterr().out)["runs"][0]["checkpoints"]
    assert [s["metrics"] for s in steps] == [{"loss": 1.234567}, {}]
    assert stepsafe.restore(tmp_path / "run1/checkpoints/1")["step"] == 1


TWO_PROCESSES = """
import sys, numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stepsafe import CheckpointManager, ManagerOptions
from stepsafe.errors import CheckpointNotFoundError
mesh = Mesh(np.array(jax.devices()).reshape(4), ("data",))
s = NamedSharding(mesh, P("data"))
options = ManagerOptions(save_interval_steps=1, async_save=True, max_to_keep=1,
                         best_fn=lambda m: m["loss"], best_mode="min")
losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0}
with CheckpointManager(sys.argv[1], options) as m:
    for step, loss in losses.items():
        w = jax.device_put(jnp.full((8,), step, jnp.float32), s)
        m.save(step, {"w": w}, metrics={"loss": loss})
    m.wait_until_finished()
    assert m.all_steps() == [2, 4], m.all_steps()  # the best (2) and the latest (4)
    assert m.metadata(4)["w"].shape == (8,)
    m.delete(2)
    assert m.all_steps() == [4], m.all_steps()
    try:
        m.delete(2)
    except CheckpointNotFoundError as e:
        print("ok refused", e, flush=True)
print("ok parity under two processes", flush=True)
"""


def test_retention_by_metric_and_delete_under_two_processes(tmp_path):
    results = jax_processes.run(
        TWO_PROCESSES, 2, args=lambda i, port: [str(tmp_path)], timeout_s=150
    )
    everything = "\n".join(r.describe() for r in results)
    for r in results:
        assert r.returncode == 0 and r.stdout.count("ok ") == 2, everything
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["4"]
    assert record(tmp_path, 4)["metrics"] == {"loss": 5.0}
