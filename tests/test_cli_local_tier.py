"""``stepsafe ls --local``: a run's local tier (emergency / multi-tier checkpoints) listed beside
its persistent one, from real files a ``CheckpointManager`` with a local tier wrote; what each
local step holds; one error line for a bad local path."""

from __future__ import annotations

import json
import shutil

import jax_processes
import numpy as np
import pytest

from stepsafe.checkpoint.own_shards import own_snapshot, write_own
from stepsafe.cli.main import main
from stepsafe.format import CommitRecord
from stepsafe.manager import CheckpointManager, ManagerOptions
from stepsafe.storage import storage_for


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def state_at(step: int) -> dict:
    return {"step": step, "params": {"w": np.full((4, 3), step, np.float32)}, "b": np.ones(2)}


@pytest.fixture
def tiers(tmp_path):
    """``out/demo`` (persistent: 10) and ``local/demo`` (12, 14 committed; 16 never committed,
    as a save killed mid-write leaves it), saved every 2 steps locally and 10 persistently."""
    options = ManagerOptions(
        save_interval_steps=10,
        local_directory=str(tmp_path / "local" / "demo"),
        local_save_interval_steps=2,
        async_save=False,
    )
    with CheckpointManager(str(tmp_path / "out" / "demo" / "checkpoints"), options) as m:
        for step in range(1, 16):
            m.save(step, state_at(step), metrics={"loss": 1 / step})
    local = tmp_path / "local" / "demo"
    shutil.copytree(local / "14", local / "16")
    (local / "16" / "_CHECKPOINT_METADATA").unlink()
    return tmp_path / "out", local


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows(section: str) -> dict[str, list[str]]:
    """Step -> whitespace-split cells, for each table row in ``section``."""
    return {
        line.split()[0]: line.split()
        for line in section.splitlines()
        if line[:1].isdigit() and len(line.split()) > 4
    }


def test_ls_shows_both_tiers_with_steps_status_and_what_each_holds(tiers, capsys):
    base, local = tiers
    code, out, err = run(capsys, "ls", base, "--local", local)
    assert code == 0 and err == ""
    persistent, _, local_part = out.partition(f"Local tier: {local} (run demo)")
    assert local_part, out
    assert set(rows(persistent)) == {"10"} and "Latest checkpoint: Step 10" in persistent
    table = rows(local_part)
    assert set(table) == {"12", "14", "16"}
    assert table["12"][3] == table["14"][3] == "Complete"
    assert table["16"][3] == "Incomplete"
    assert "whole state" in " ".join(table["14"])  # one process: an ordinary checkpoint
    assert "loss=0.07143" in table["14"]  # the metrics column, as in the persistent table
    assert "Local total: 3 checkpoint(s) (1 incomplete)" in local_part
    assert "Latest local checkpoint: Step 14" in local_part
    assert "newer than the persistent Step 10" in local_part
    assert "Grand Total: 1 run(s), 1 checkpoint(s)" in local_part


def test_ls_json_lists_the_local_tier(tiers, capsys):
    base, local = tiers
    code, out, _ = run(capsys, "ls", base, "--local", local, "--json")
    assert code == 0
    doc = json.loads(out)
    assert [c["step"] for c in doc["runs"][0]["checkpoints"]] == [10]
    (tier,) = doc["local_tiers"]
    assert tier["path"] == str(local) and tier["latest_step"] == 14
    assert tier["num_checkpoints"] == 3 and tier["num_complete"] == 2
    by_step = {c["step"]: c for c in tier["checkpoints"]}
    assert by_step[14]["status"] == "Complete" and by_step[16]["status"] == "Incomplete"
    assert by_step[14]["holds"] == "whole state" and by_step[16]["holds"] is None
    assert by_step[14]["process_index"] is None and by_step[14]["metrics"] == {"loss": 1 / 14}
    assert tier["size_bytes"] == sum(c["size_bytes"] for c in tier["checkpoints"])
    assert json.loads(run(capsys, "ls", base, "--json")[1])["local_tiers"] == []


def test_a_damaged_local_step_is_listed_as_damaged_with_why(tiers, capsys):
    base, local = tiers
    (local / "12" / "_CHECKPOINT_METADATA").write_text('{"format": "stepsafe", "oops"')
    code, out, _ = run(capsys, "ls", base, "--local", local)
    assert code == 0
    local_part = out.partition("Local tier:")[2]
    assert rows(local_part)["12"][3] == "Damaged" and "  12: Damaged: " in local_part
    assert "Local total: 3 checkpoint(s) (1 incomplete) (1 not intact" in local_part
    assert "Latest local checkpoint: Step 14" in local_part


def test_a_step_of_one_process_s_shards_says_whose(tmp_path, capsys):
    """A step of a multi-process job holds one process's shards (``own_shards.json``); one
    process writes one here, through the same functions the local tier uses."""
    storage, directory = storage_for(str(tmp_path / "local" / "demo"))
    snap, descriptor = own_snapshot(state_at(4), copy=False)
    path = storage.join(directory, "4")
    write_own(storage, path, snap, CommitRecord(step=4), {"own_shards.json": descriptor})
    (tmp_path / "out").mkdir()
    code, out, _ = run(capsys, "ls", tmp_path / "out", "--local", tmp_path / "local" / "demo")
    assert code == 0
    row = " ".join(rows(out.partition("Local tier:")[2])["4"])
    assert "Complete" in row and "process 0 of 1's shards" in row
    doc = json.loads(run(capsys, "ls", tmp_path / "out", "--local", directory, "--json")[1])
    step = doc["local_tiers"][0]["checkpoints"][0]
    assert (step["process_index"], step["process_count"]) == (0, 1)


TWO_PROCESSES = """
import sys, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stepsafe import CheckpointManager, ManagerOptions
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
w = np.arange(32, dtype=np.float32).reshape(8, 4)
state = {"w": jax.make_array_from_callback((8, 4), NamedSharding(mesh, P("data")), w.__getitem__)}
options = ManagerOptions(
    save_interval_steps=10, local_directory=sys.argv[2], local_save_interval_steps=2,
    async_save=False,
)
with CheckpointManager(sys.argv[1], options) as m:
    for step in range(1, 5):
        m.save(step, state)
print("ok", m.local_steps(), flush=True)
"""


def test_each_process_s_local_tier_says_whose_shards_it_holds(tmp_path, capsys):
    """A job of 2 real processes, each with a local directory of its own: each step of each
    holds that process's shards, and ``ls`` says whose, one --local per directory."""
    persistent = tmp_path / "out" / "demo" / "checkpoints"
    local = [tmp_path / f"local_p{i}" / "demo" for i in range(2)]
    results = jax_processes.run(
        TWO_PROCESSES, 2, args=lambda i, _: [str(persistent), str(local[i])], timeout_s=120
    )
    for r in results:
        assert r.returncode == 0 and "ok [2, 4]" in r.stdout, r.describe()
    code, out, _ = run(capsys, "ls", tmp_path / "out", "--local", local[0], "--local", local[1])
    assert code == 0
    p0, _, p1 = out.partition(f"Local tier: {local[0]} (run demo)")[2].partition("Local tier:")
    for i, section in enumerate((p0, p1)):
        table = rows(section)
        assert set(table) == {"2", "4"}
        assert all(f"process {i} of 2's shards" in " ".join(r) for r in table.values())
        said = " ".join(section.split())
        assert "the persistent tier holds no step: a resume takes it if all 2 processes" in said


def test_local_given_one_level_too_high_points_to_the_run_s_directory(tiers, capsys):
    base, local = tiers
    code, out, _ = run(capsys, "ls", base, "--local", local.parent)
    assert code == 0
    assert "Found 0 local checkpoint(s):" in out
    assert f"{local} holds some: pass --local {local}" in out


@pytest.mark.parametrize("bad", ["missing", "a_file"])
def test_a_bad_local_path_is_one_error_line(tiers, tmp_path, capsys, bad):
    base, _ = tiers
    (tmp_path / "a_file").write_text("not a directory")
    code, out, err = run(capsys, "ls", base, "--local", tmp_path / bad)
    assert code == 4 and out == ""  # nothing half printed
    lines = err.splitlines()
    assert lines[0] == (
        f"stepsafe: error: local tier {tmp_path / bad} does not exist or is not a directory"
    )
    assert len(lines) == 2 and lines[1].startswith("hint: ") and "--local" in lines[1]


def test_multi_tier_promotes_a_forced_save_of_a_step_already_saved_locally(tmp_path, capsys):
    """The final save (``force=True``, save_checkpoint_on_completion) of a step the local period
    saved already must still reach the persistent tier: the run's last step must not live only
    on a local disk. ``stepsafe ls`` is how a user sees it."""
    options = ManagerOptions(
        save_interval_steps=10,
        local_directory=str(tmp_path / "local" / "demo"),
        local_save_interval_steps=2,
        async_save=False,
        multi_tier=True,
        backup_interval_steps=5,
    )
    with CheckpointManager(str(tmp_path / "out" / "demo" / "checkpoints"), options) as m:
        for step in range(1, 13):
            m.save(step, state_at(step))
        m.save(12, state_at(12), force=True)  # the end of the run
    doc = json.loads(run(capsys, "ls", tmp_path / "out", "--json")[1])
    assert doc["runs"][0]["latest_step"] == 12
