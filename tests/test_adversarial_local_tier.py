"""Adversarial tests of the local tier (issue #14): attacks on local_tier.py, tiers.py,
promoter.py, own_shards.py and the trainer's flags. Tests marked xfail(strict) expose a real
break (see each reason); the others show a defence that holds. Real files, real processes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import jax_processes
import numpy as np
import pytest
from iterators import Counter as Iterator

import stepsafe
from stepsafe.errors import ConfigError, StepsafeError, TargetMismatchError
from stepsafe.manager import CheckpointManager, ManagerOptions


def state_at(step: int, mark: int = 0) -> dict:
    w = np.full((4, 3), step + mark, np.float32)
    return {"step": step, "params": {"w": w}, "b": np.ones(2)}


def target() -> dict:
    return {"step": 0, "params": {"w": np.zeros((4, 3), np.float32)}, "b": np.zeros(2)}


def manager(tmp_path, persistent: str = "persistent", **options) -> CheckpointManager:
    options = {
        "save_interval_steps": 10,
        "local_directory": str(tmp_path / "local" / "run"),
        "local_save_interval_steps": 2,
        "async_save": False,
        **options,
    }
    return CheckpointManager(str(tmp_path / persistent), ManagerOptions(**options))


def train(m: CheckpointManager, start: int, stop: int, mark: int = 0, it=None) -> None:
    for step in range(start + 1, stop + 1):
        if it is not None:
            it.position = step * 7 + mark
        m.save(step, state_at(step, mark), data_iterator=it)


# -- user files in the local directory ----------------------------------------------------------


def test_stale_drop_never_deletes_a_user_directory_named_like_a_step(tmp_path):
    user = tmp_path / "local" / "run" / "30"
    user.mkdir(parents=True)
    (user / "notes.txt").write_text("my notes")
    with manager(tmp_path) as m:
        train(m, 0, 3)  # from scratch: the first local save drops steps >= 2
    assert (user / "notes.txt").read_text() == "my notes"


def test_retention_and_cleanup_leave_user_files_in_the_local_directory(tmp_path):
    local = tmp_path / "local" / "run"
    local.mkdir(parents=True)
    (local / "notes.txt").write_text("n")
    (local / "data").mkdir()
    (local / "data" / "x.bin").write_bytes(b"x")
    (local / "007").mkdir()  # not a step's name (leading zero)
    (local / "007" / "f").write_text("f")
    with manager(tmp_path, local_max_to_keep=1) as m:
        train(m, 0, 9)
        assert m.local_steps() == [8]
    assert (local / "notes.txt").read_text() == "n"
    assert (local / "data" / "x.bin").read_bytes() == b"x"
    assert (local / "007" / "f").read_text() == "f"


def test_a_step_named_symlink_in_the_local_directory_is_never_followed(tmp_path):
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("k")
    local = tmp_path / "local" / "run"
    local.mkdir(parents=True)
    os.symlink(elsewhere, local / "40")
    with manager(tmp_path) as m:
        train(m, 0, 5)
    assert (elsewhere / "keep.txt").read_text() == "k"


def test_a_file_where_the_local_directory_should_be_is_a_clear_error(tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "run").write_text("not a directory")
    with pytest.raises(StepsafeError, match="run"):
        manager(tmp_path)


# -- mixing trajectories --------------------------------------------------------------------------


def test_a_rollback_mid_run_does_not_leave_the_abandoned_trajectory_to_resume_from(tmp_path):
    with manager(tmp_path, save_interval_steps=1000, local_max_to_keep=3) as m:
        train(m, 0, 20)  # local [16, 18, 20]
        m.restore(16, target())  # a loss spike: roll back, go on with other data
        train(m, 16, 19, mark=1000)  # saves 18 of the new trajectory
    with manager(tmp_path, save_interval_steps=1000, local_max_to_keep=3) as m:
        step, state = m.restore_newest(target())
    assert (step, float(state["params"]["w"][0, 0])) == (18, 1018.0)


def test_a_damaged_newest_persistent_step_does_not_hide_newer_local_steps(tmp_path):
    with manager(tmp_path, local_save_interval_steps=3) as m:
        train(m, 0, 20)  # persistent [10, 20], local [15, 18]
    items = tmp_path / "persistent" / "20" / "items"
    data = next(p for p in items.iterdir() if p.name.endswith(".data"))
    data.write_bytes(b"\0" * data.stat().st_size)
    with manager(tmp_path, local_save_interval_steps=3) as m:
        step, state = m.restore_newest(target())
        train(m, step, step + 3)
        local = m.local_steps()
    assert step == 18 and state["step"] == 18, f"resumed at {step}; local steps now {local}"


def test_local_steps_of_another_run_are_not_resumed(tmp_path):
    with manager(tmp_path, persistent="job_a") as m:
        train(m, 0, 15, mark=500)
    with pytest.raises(ConfigError, match="belongs to the run whose persistent tier is"):
        manager(tmp_path, persistent="job_b")  # a brand-new run, same local dir: refused


def test_two_live_runs_cannot_share_one_local_directory(tmp_path):
    with manager(tmp_path, persistent="job_a") as a:
        with pytest.raises(StepsafeError):
            manager(tmp_path, persistent="job_b").close()
        a.wait_until_finished()


def test_a_local_step_holding_another_steps_files_is_not_restored_as_it(tmp_path):
    with manager(tmp_path, local_max_to_keep=3) as m:
        train(m, 0, 15, it=Iterator())  # local [10, 12, 14]
    local = tmp_path / "local" / "run"
    shutil.rmtree(local / "14")
    shutil.copytree(local / "12", local / "14")
    it = Iterator()
    with manager(tmp_path, local_max_to_keep=3) as m:
        step, state = m.restore_newest(target(), data_iterator=it)
    assert state["step"] == step, f"step {step} restored with the state of {state['step']}"


def test_a_stale_step_left_in_place_is_not_resumed_from(tmp_path):
    with manager(tmp_path, persistent="p", save_interval_steps=1000) as m:
        train(m, 0, 7, mark=500)  # local [4, 6] of an old run
    (tmp_path / "local" / "run" / "6" / "notes.txt").write_text("mine")
    shutil.rmtree(tmp_path / "p")  # the run starts again from scratch
    with manager(tmp_path, persistent="p", save_interval_steps=1000) as m:
        train(m, 0, 5)  # new local [2, 4]; the old 6 stays (it holds a user's file)
    with manager(tmp_path, persistent="p", save_interval_steps=1000) as m:
        step, state = m.restore_newest(target())
    assert (tmp_path / "local" / "run" / "6" / "notes.txt").read_text() == "mine"
    assert float(state["params"]["w"][0, 0]) < 500, f"resumed the old run's step {step}"


def test_a_fresh_start_drops_stale_local_steps_before_its_first_save(tmp_path, caplog):
    with manager(tmp_path, persistent="p", save_interval_steps=1000) as m:
        train(m, 0, 9, mark=500)  # local [6, 8]
    shutil.rmtree(tmp_path / "p")  # the user restarts the run from scratch
    opts = {"persistent": "p", "save_interval_steps": 1000}
    with caplog.at_level(logging.WARNING, "stepsafe"), manager(tmp_path, **opts) as m:
        train(m, 0, 3)
        assert m.local_steps() == [2]
    assert "Deleting local checkpoint at step 8" in caplog.text


def test_explicit_restore_of_a_persistent_step_then_saving_drops_newer_local_steps(tmp_path):
    with manager(tmp_path, local_max_to_keep=3) as m:
        train(m, 0, 15, mark=500)  # persistent [10], local [10, 12, 14]
    with manager(tmp_path, local_max_to_keep=3) as m:
        m.restore(10, target())
        train(m, 10, 13, mark=0)
        assert m.local_steps() == [10, 12]
        assert float(m.restore(12, target())["params"]["w"][0, 0]) == 12.0


# -- restore choices -----------------------------------------------------------------------------


def test_a_local_step_of_another_tree_falls_back_and_the_mismatch_is_raised(tmp_path, caplog):
    with manager(tmp_path) as m:
        train(m, 0, 13)
    changed = {**target(), "params": {"w": np.zeros((4, 3), np.float32), "v": np.zeros(1)}}
    with (
        caplog.at_level(logging.ERROR, "stepsafe"),
        manager(tmp_path) as m,
        pytest.raises(TargetMismatchError),
    ):
        m.restore_newest(changed)
    assert "Local checkpoint at step 12 cannot be restored" in caplog.text


def test_target_none_and_select_from_a_local_step(tmp_path):
    with manager(tmp_path) as m:
        train(m, 0, 13)
    with manager(tmp_path) as m:
        step, state = m.restore_newest()
        assert step == 12 and int(state["step"]) == 12
        np.testing.assert_array_equal(m.restore(12, select="b"), np.ones(2))


def test_an_iterator_asked_for_but_not_saved_with_the_local_step_is_an_error(tmp_path):
    with manager(tmp_path) as m:
        train(m, 0, 13)  # no iterator
    with manager(tmp_path) as m, pytest.raises(StepsafeError):
        m.restore(12, target(), data_iterator=Iterator())


# -- promotion -----------------------------------------------------------------------------------


def test_interpreter_exit_during_promotion_leaves_a_whole_step_or_none(tmp_path):
    script = textwrap.dedent(
        f"""
        import numpy as np
        from stepsafe.manager import CheckpointManager, ManagerOptions
        o = ManagerOptions(local_directory={str(tmp_path / "local")!r},
            local_save_interval_steps=1, multi_tier=True, backup_interval_steps=1,
            async_save=True)
        m = CheckpointManager({str(tmp_path / "p")!r}, o)
        for step in range(1, 4):
            m.save(step, {{"w": np.full((256, 256), step, np.float32)}})
        # no close(): the interpreter exits with the promotion in flight
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    steps = sorted(int(p.name) for p in (tmp_path / "p").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == 3, steps
    for step in steps:
        assert stepsafe.verify(str(tmp_path / "p" / str(step))).ok


def test_a_persistent_step_name_holding_user_files_is_never_overwritten_by_promotion(tmp_path):
    user = tmp_path / "persistent" / "2"
    user.mkdir(parents=True)
    (user / "mine.txt").write_text("mine")
    with manager(tmp_path, multi_tier=True, backup_interval_steps=2, async_save=True) as m:
        train(m, 0, 4)
    assert (user / "mine.txt").read_text() == "mine"
    assert sorted(os.listdir(user)) == ["mine.txt"]
    assert stepsafe.verify(str(tmp_path / "persistent" / "4")).ok


def test_promoting_a_step_with_no_local_copy_fails_loudly_and_keeps_the_tier(tmp_path, caplog):
    with manager(tmp_path, multi_tier=True, backup_interval_steps=2) as m:
        train(m, 0, 2)
        m.wait_until_finished()  # the promotion runs in its own thread
        assert m.all_steps() == [2]
        train(m, 2, 3)
        shutil.rmtree(tmp_path / "local" / "run" / "2")
        with caplog.at_level(logging.ERROR, "stepsafe"):
            m._promoter.offer(3)  # not a local step (odd period): nothing to copy
            m.wait_until_finished()
        assert m.all_steps() == [2]
    assert "Promotion of local step 3" in caplog.text


# -- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", "."])
def test_run_name_dot_dot_is_refused(name):
    from stepsafe.config.load import load_config

    with pytest.raises(StepsafeError, match="run_name"):
        load_config(None, [f"run_name={name}"])


def test_a_relative_local_directory_is_fixed_at_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with manager(tmp_path, local_directory="rel/run") as m:
        train(m, 0, 2)
        monkeypatch.chdir("/")
        train(m, 2, 4)
        assert m.local_steps() == [2, 4]
    assert sorted(os.listdir(tmp_path / "rel" / "run")) == ["2", "4", "_LOCAL_TIER.json"]


# -- several processes ---------------------------------------------------------------------------

MP_SCRIPT = """
import json, logging, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stepsafe.manager import CheckpointManager, ManagerOptions
logging.basicConfig(level=logging.INFO)
root, phase, mark = sys.argv[1], sys.argv[2], int(sys.argv[3])
mesh = Mesh(np.array(jax.devices()), ("x",))
sh = NamedSharding(mesh, P("x"))
def state(step):
    return {"w": jax.make_array_from_callback((8, 2), sh,
        lambda idx: np.full((8, 2), step + mark, np.float32)[idx])}
abstract = {"w": jax.ShapeDtypeStruct((8, 2), np.float32, sharding=sh)}
p = jax.process_index()
o = ManagerOptions(save_interval_steps=4, local_directory=f"{root}/local/p{p}",
    local_save_interval_steps=2, async_save=False)
with CheckpointManager(f"{root}/persistent", o) as m:
    if phase == "save":
        for step in range(1, 8):
            m.save(step, state(step))
        print("LOCAL", m.local_steps())
    else:
        step, st = m.restore_newest(abstract)
        w = np.asarray(jax.device_get(st["w"].addressable_shards[0].data))
        print("RESTORED", step, float(w.flat[0]))
"""


def run_mp(root, phase, mark=0):
    results = jax_processes.run(
        MP_SCRIPT, 2, args=lambda i, port: [str(root), phase, str(mark)], timeout_s=120
    )
    for r in results:
        assert r.returncode == 0, r.describe()
    return results


def test_a_tampered_own_shards_descriptor_is_passed_by_on_every_process(tmp_path):
    run_mp(tmp_path, "save")  # persistent [4], local [4, 6] on each process
    desc = next((tmp_path / "local" / "p1" / "6").glob("own_shards*.json"))
    d = json.loads(desc.read_text())
    d["process_index"] = 0
    desc.write_text(json.dumps(d))
    results = run_mp(tmp_path, "restore")
    for r in results:
        assert "RESTORED 4 4.0" in r.stdout, r.describe()


def test_leftover_own_shards_steps_after_going_from_two_processes_to_one(tmp_path):
    run_mp(tmp_path, "save")
    o = ManagerOptions(
        save_interval_steps=4, local_directory=str(tmp_path / "local" / "p0"),
        local_save_interval_steps=2, async_save=False,
    )  # fmt: skip
    with CheckpointManager(str(tmp_path / "persistent"), o) as m:
        assert m.latest_step() == 4  # the only step this one process can restore


def test_two_processes_never_restore_a_step_mixed_from_two_runs(tmp_path):
    run_mp(tmp_path, "save", mark=500)  # persistent [4], local [4, 6] on each process
    (tmp_path / "local" / "p0" / "6" / "notes.txt").write_text("mine")
    shutil.rmtree(tmp_path / "persistent")  # the job starts again from scratch
    run_mp(tmp_path, "save", mark=0)
    values = {r.stdout.split("RESTORED")[1].split()[1] for r in run_mp(tmp_path, "restore")}
    assert len(values) == 1, f"processes restored different runs' values: {values}"


MT_SCRIPT = """
import logging, sys, time
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stepsafe.manager import CheckpointManager, ManagerOptions
logging.basicConfig(level=logging.INFO)
root = sys.argv[1]
mesh = Mesh(np.array(jax.devices()), ("x",))
sh = NamedSharding(mesh, P("x"))
def state(step):
    return {"w": jax.make_array_from_callback((8, 2), sh,
        lambda idx: np.full((8, 2), step, np.float32)[idx])}
p = jax.process_index()
o = ManagerOptions(local_directory=f"{root}/local/p{p}", local_save_interval_steps=2,
    multi_tier=True, backup_interval_steps=2, async_save=True)
t0 = time.monotonic()
with CheckpointManager(f"{root}/persistent", o) as m:
    for step in range(1, 9):
        m.save(step, state(step))
    m.save(8, state(8), force=True)
print("DONE", round(time.monotonic() - t0, 1))
"""


def test_one_process_unable_to_save_a_local_step_does_not_desync_promotion(tmp_path):
    user = tmp_path / "local" / "p0" / "4"
    user.mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    results = jax_processes.run(
        MT_SCRIPT, 2, args=lambda i, port: [str(tmp_path)], timeout_s=150,
        env={"STEPSAFE_COORDINATION_TIMEOUT_S": "10"},
    )  # fmt: skip
    assert (user / "notes.txt").read_text() == "mine"
    for r in results:
        assert r.returncode == 0 and "DONE" in r.stdout, r.describe()
        assert "CoordinationError" not in r.stderr, r.describe()
    steps = sorted(int(n) for n in os.listdir(tmp_path / "persistent") if n.isdigit())
    assert steps and steps[-1] == 8, steps
    assert stepsafe.verify(str(tmp_path / "persistent" / "8")).ok


def test_swapped_local_disks_fall_back_to_the_persistent_tier_on_every_process(tmp_path):
    run_mp(tmp_path, "save")  # persistent [4], local [4, 6] on each process
    local = tmp_path / "local"
    (local / "p0").rename(local / "tmp")
    (local / "p1").rename(local / "p0")
    (local / "tmp").rename(local / "p1")
    for r in run_mp(tmp_path, "restore"):
        assert "RESTORED 4 4.0" in r.stdout, r.describe()
        # each disk holds the other process's shards: not counted as this process's steps
        assert "no local step is on every process" in r.stderr, r.describe()


def test_a_damaged_local_copy_of_a_promoted_step_falls_back_to_the_same_persistent_step(
    tmp_path, caplog
):
    with manager(tmp_path, multi_tier=True, backup_interval_steps=2) as m:
        train(m, 0, 4)
        m.wait_until_finished()
        assert m.all_steps() == [2, 4]
    items = tmp_path / "local" / "run" / "4" / "items"
    data = next(p for p in items.iterdir() if p.name.endswith(".data"))
    data.write_bytes(b"\xff" * data.stat().st_size)
    with caplog.at_level(logging.INFO, "stepsafe"), manager(tmp_path) as m:
        step, state = m.restore_newest(target())
        assert m.restored_path == m.step_path(4)
    assert step == 4 and state["step"] == 4
    assert "Local checkpoint at step 4 cannot be restored" in caplog.text


def test_a_refused_local_save_does_not_push_the_next_promotion_back(tmp_path):
    user = tmp_path / "local" / "run" / "6"
    user.mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    with manager(tmp_path, multi_tier=True, backup_interval_steps=4) as m:
        train(m, 0, 9)
        m.wait_until_finished()
        steps = m.all_steps()
    assert (user / "notes.txt").read_text() == "mine"
    assert steps == [2, 8], steps  # 6 cannot be saved: 8 is the next, 4 steps after 2


def test_a_changed_model_with_local_steps_only_says_the_target_does_not_fit(tmp_path):
    with manager(tmp_path, save_interval_steps=1000) as m:
        train(m, 0, 5)  # local [2, 4]; the persistent tier has nothing yet
    changed = {**target(), "params": {"w": np.zeros((4, 3), np.float32), "v": np.zeros(1)}}
    with manager(tmp_path, save_interval_steps=1000) as m:
        assert m.latest_step() == 4
        with pytest.raises(TargetMismatchError):
            m.restore_newest(changed)


def test_a_promoted_step_keeps_the_iterator_state_and_metadata(tmp_path):
    opts = {"multi_tier": True, "backup_interval_steps": 2, "async_save": True}
    with manager(tmp_path, **opts) as m:
        it = Iterator()
        for step in (1, 2):
            it.position = step * 7
            m.save(step, state_at(step), data_iterator=it, metrics={"loss": 0.5 * step})
    shutil.rmtree(tmp_path / "local")  # only the persistent copy is left
    it = Iterator()
    with manager(tmp_path) as m:
        step, state = m.restore_newest(target(), data_iterator=it)
    assert (step, state["step"], it.position) == (2, 2, 14)
    assert stepsafe.verify(str(tmp_path / "persistent" / "2")).ok


def test_two_processes_resume_a_promoted_step_when_every_local_disk_is_wiped(tmp_path):
    results = jax_processes.run(
        MT_SCRIPT, 2, args=lambda i, port: [str(tmp_path)], timeout_s=150,
        env={"STEPSAFE_COORDINATION_TIMEOUT_S": "30"},
    )  # fmt: skip
    for r in results:
        assert r.returncode == 0 and "DONE" in r.stdout, r.describe()
    assert stepsafe.verify(str(tmp_path / "persistent" / "8")).ok
    shutil.rmtree(tmp_path / "local")
    for r in run_mp(tmp_path, "restore"):
        assert "RESTORED 8 8.0" in r.stdout, r.describe()


def test_a_local_directory_that_is_the_persistent_directory_is_refused(tmp_path):
    same = str(tmp_path / "persistent")
    refused = False
    try:
        with manager(tmp_path, local_directory=same, max_to_keep=0) as m:
            train(m, 0, 15)
    except StepsafeError:
        refused = True
    steps = sorted(int(n) for n in os.listdir(same) if n.isdigit())
    assert refused, f"not refused; the persistent directory now holds steps {steps}"


def take_lease_over(tmp_path) -> None:
    (tmp_path / "persistent" / "_LEASE").write_text('{"taken": "by another manager"}')


def test_a_promotion_waiting_when_the_lease_is_lost_writes_nothing(tmp_path, caplog):
    with manager(tmp_path, multi_tier=True, backup_interval_steps=4) as m:
        train(m, 0, 4)  # 2 promoted (the first); 4 not due yet
        m.wait_until_finished()
        take_lease_over(tmp_path)
        with caplog.at_level(logging.ERROR, "stepsafe"):
            m._promoter.offer(4)
            m.wait_until_finished()
        assert not (tmp_path / "persistent" / "4").exists()
        with pytest.raises(StepsafeError, match="taken over"):
            m.save(6, state_at(6))  # due: the lease is checked
    assert "Promotion of local step 4" in caplog.text and "RunInUseError" in caplog.text


def test_a_local_save_after_the_lease_is_lost_is_refused(tmp_path):
    with manager(tmp_path) as m:
        train(m, 0, 2)
        take_lease_over(tmp_path)
        with pytest.raises(StepsafeError, match="taken over"):
            m.save(4, state_at(4))  # a local-tier step only
