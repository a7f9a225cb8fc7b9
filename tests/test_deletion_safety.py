"""Deleting and listing never lose or mistake what a user keeps in a run directory.

gc and retention delete only what stepsafe wrote (by name, never through a symbolic link), keep
the newest intact steps, leave damaged, linked, Orbax and unknown steps alone, tolerate another
deleter at work, and clean up after a deletion that was cut short. ``ls`` lists every such entry
with its own status, and its times with their time zone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import stepsafe
from stepsafe.checkpoint.run_layout import is_step_name, step_number
from stepsafe.cli.main import main
from stepsafe.errors import DeletionError
from stepsafe.format.deletion import delete_checkpoint, extra_save_id, items_save_id
from stepsafe.manager import CheckpointManager, ManagerOptions
from stepsafe.manager.gc import gc
from stepsafe.manager.inventory import list_runs
from stepsafe.storage import LocalStorage, storage_for

OTHER_ID = "0123456789ab"  # the save id of an earlier save of a step, which died


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def state(step: int) -> dict:
    return {"step": step, "w": np.arange(8, dtype=np.float32) + step}


def save_steps(run: Path, *steps: int) -> Path:
    ckpts = run / "checkpoints"
    for s in steps:
        stepsafe.save(ckpts / str(s), state(s))
    return ckpts


def manager(ckpts: Path, keep: int, async_save: bool = False) -> CheckpointManager:
    opts = ManagerOptions(async_save=async_save, save_interval_steps=1, max_to_keep=keep)
    return CheckpointManager(str(ckpts), opts)


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def names(ckpts: Path) -> list[str]:
    """The entries of a checkpoints directory, but the manager's own files (its lease)."""
    return sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("_"))


def statuses(run: Path) -> dict[str, str]:
    (r,) = list_runs(str(run)).runs
    return {s.name: s.status for s in r.steps}


# -- 1. the stray-file sweep --------------------------------------------------------------------
def test_gc_never_deletes_through_a_link_nor_a_users_files(tmp_path, capsys):
    """The issue's reproduction: a link in a kept step to a directory outside the run, and a
    README beside the arrays. gc deletes the old step, and nothing else."""
    outside = tmp_path / "v"
    outside.mkdir()
    (outside / "f.txt").write_text("x")
    ckpts = save_steps(tmp_path / "run", 1, 2)
    (ckpts / "2" / "notes").symlink_to(outside)
    (ckpts / "2" / "README.txt").write_text("n")
    code, out, _ = cli(capsys, "gc", tmp_path / "run", "--keep", "1")
    assert code == 0, out
    assert (outside / "f.txt").read_text() == "x"
    assert (ckpts / "2" / "README.txt").read_text() == "n"
    assert (ckpts / "2" / "notes").is_symlink()
    assert names(ckpts) == ["2"]
    assert stepsafe.restore(str(tmp_path / "run"))["step"] == 2


def test_gc_deletes_exactly_the_files_of_a_dead_save_of_the_step_and_says_why(tmp_path, capsys):
    outside = tmp_path / "outside"
    (outside / "iter").mkdir(parents=True)
    (outside / "iter" / f"process_0.{OTHER_ID}.json").write_text("{}")
    (outside / f"process_0.00000.{OTHER_ID}.data").write_bytes(b"keep me")
    ckpts = save_steps(tmp_path / "run", 1)
    step = ckpts / "1"
    strays = [
        f"items/manifest.{OTHER_ID}.json",
        f"items/process_0.00000.{OTHER_ID}.data",
        f"iter/process_0.{OTHER_ID}.json",
    ]
    for rel in strays:
        (step / rel).parent.mkdir(exist_ok=True)
        (step / rel).write_bytes(b"dead save")
    # extra-shaped, but no items/ file carries its id: may be a user's (eval.20241130.json)
    kept = ["items/notes.txt", "README.md", "iter/process_0.json", "items/manifest.json",
            "iter/process_0.fedcba987654.json"]  # fmt: skip
    for rel in kept:
        (step / rel).parent.mkdir(exist_ok=True)
        (step / rel).write_text("mine")
    (step / "linked").symlink_to(outside / "iter")  # a directory of stray-like names, outside
    (step / "items" / f"process_1.00000.{OTHER_ID}.data").symlink_to(
        outside / f"process_0.00000.{OTHER_ID}.data"
    )
    want = sorted(str(step / rel) for rel in strays)

    code, out, _ = cli(capsys, "gc", tmp_path / "run", "--keep", "1", "--dry-run", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["stray_files"] == {"1": want}
    assert sorted(doc["stray_reasons"]) == want
    assert all(OTHER_ID in why for why in doc["stray_reasons"].values())
    code, out, _ = cli(capsys, "gc", tmp_path / "run", "--keep", "1", "--dry-run")
    listed = [line.split(":")[0].strip() for line in out.splitlines() if str(step) in line]
    assert sorted(listed) == want and "Would delete 3 stray file(s) in step 1" in out
    assert all((step / rel).exists() for rel in strays)  # a dry run deletes nothing

    code, out, _ = cli(capsys, "gc", tmp_path / "run", "--keep", "1")
    assert code == 0 and not any((step / rel).exists() for rel in strays)
    assert all((step / rel).read_text() == "mine" for rel in kept)
    assert (outside / "iter" / f"process_0.{OTHER_ID}.json").exists()
    assert (outside / f"process_0.00000.{OTHER_ID}.data").read_bytes() == b"keep me"
    assert (step / "linked").is_symlink()
    assert stepsafe.verify(str(step)).ok


def test_own_names_follow_the_layout():
    assert items_save_id(f"items/manifest.{OTHER_ID}.json") == OTHER_ID
    assert items_save_id(f"items/process_3.00012.{OTHER_ID}.data") == OTHER_ID
    assert extra_save_id(f"iter/process_0.{OTHER_ID}.json") == OTHER_ID
    assert extra_save_id(f"iter/process_0.{OTHER_ID}.bin") == OTHER_ID
    assert items_save_id(f"iter/process_0.{OTHER_ID}.json") is None
    for name in ("README.txt", "items/notes.txt", "items/manifest.json", f"items/x.{OTHER_ID}.txt",
                 f"../up.{OTHER_ID}.json", "iter/process_0.json", "_METADATA"):  # fmt: skip
        assert items_save_id(name) is None and extra_save_id(name) is None, name


# -- 2. a step directory that is a link ---------------------------------------------------------
def test_a_linked_step_is_listed_as_such_and_never_deleted_through(tmp_path, capsys):
    other = save_steps(tmp_path / "other", 1)
    ckpts = save_steps(tmp_path / "run", 2, 3)
    (ckpts / "1").symlink_to(other / "1")
    (ckpts / "7").symlink_to(ckpts / "7")  # a loop: ELOOP for anything that follows it
    assert statuses(tmp_path / "run") == {"1": "Symlink", "2": "Complete", "3": "Complete",
                                          "7": "Symlink"}  # fmt: skip
    code, out, err = cli(capsys, "ls", tmp_path / "run")
    assert code == 0 and "Traceback" not in err
    assert "Symlink" in out and "Latest checkpoint: Step 3" in out
    code, out, _ = cli(capsys, "gc", tmp_path / "run", "--keep", "1", "--json")
    doc = json.loads(out)
    assert code == 0 and [a["step"] for a in doc["delete"]] == [2]
    kept = {a["step"]: a["reason"] for a in doc["keep"]}
    assert "symbolic link" in kept[1] and "symbolic link" in kept[7]
    assert (ckpts / "1").is_symlink() and stepsafe.verify(str(other / "1")).ok
    with pytest.raises(DeletionError, match="symbolic link"):
        delete_checkpoint(LocalStorage(), str(ckpts / "1"))
    assert stepsafe.verify(str(other / "1")).ok


@pytest.mark.parametrize("async_save", [False, True])
def test_retention_never_deletes_through_a_linked_step(tmp_path, async_save):
    other = save_steps(tmp_path / "other", 1)
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "1").symlink_to(other / "1")
    with manager(ckpts, keep=1, async_save=async_save) as m:
        for step in (2, 3, 4):
            assert m.save(step, state(step))  # raises the previous save's failure, if any
    assert stepsafe.verify(str(other / "1")).ok and (ckpts / "1").is_symlink()
    assert names(ckpts) == ["1", "4"]


# -- 3. checkpoints stepsafe did not write ------------------------------------------------------
def write_orbax_step(step_dir: Path, item: str, with_metadata: bool = True) -> None:
    """The layout Orbax 0.11 writes for a PyTree item with OCDBT, by hand (orbax-checkpoint is
    not installed here): step-level metadata without stepsafe's "format", an item directory."""
    d = step_dir / item
    (d / "d").mkdir(parents=True)
    (d / "d" / "1f2e3d4c5b6a").write_bytes(b"\0" * 64)
    (d / "ocdbt.process_0").mkdir()
    (d / "manifest.ocdbt").write_bytes(b"\x01" * 16)
    (d / "_METADATA").write_text(json.dumps({"tree_metadata": {}, "use_zarr3": False}))
    (d / "_sharding").write_text("{}")
    if with_metadata:
        (step_dir / "_CHECKPOINT_METADATA").write_text(json.dumps({
            "item_handlers": {item: "PyTreeCheckpointHandler"}, "metrics": {},
            "performance_metrics": {}, "init_timestamp_nsecs": 1764535267000000000,
            "commit_timestamp_nsecs": 1764535268000000000, "custom_metadata": {},
        }))  # fmt: skip


def test_orbax_and_unknown_steps_are_listed_as_such_and_left_alone(tmp_path, capsys):
    run = tmp_path / "run"
    ckpts = save_steps(run, 10, 20)
    write_orbax_step(ckpts / "1", "default")
    write_orbax_step(ckpts / "2", "items")  # MaxText's item name, which stepsafe uses too
    write_orbax_step(ckpts / "3", "state", with_metadata=False)
    (ckpts / "4").mkdir()
    (ckpts / "4" / "model.pt").write_bytes(b"torch")
    (ckpts / "5").write_text("a file, not a directory")
    assert statuses(run) == {"1": "Orbax", "2": "Orbax", "3": "Orbax", "4": "Foreign",
                             "5": "Foreign", "10": "Complete", "20": "Complete"}  # fmt: skip
    code, out, _ = cli(capsys, "ls", run, "--json")
    doc = json.loads(out)["runs"][0]
    assert doc["latest_step"] == 20 and doc["num_complete"] == 2
    code, out, _ = cli(capsys, "ls", run)
    assert "(2 incomplete)" not in out and "Incomplete" not in out and "Orbax" in out

    code, out, _ = cli(capsys, "gc", run, "--keep", "1", "--dry-run", "--json")
    assert code == 0 and [a["step"] for a in json.loads(out)["delete"]] == [10]
    with manager(ckpts, keep=1) as m:
        m.save(30, state(30))
    gc(str(run), keep=1)
    assert names(ckpts) == ["1", "2", "3", "30", "4", "5"]
    assert (ckpts / "2" / "items" / "manifest.ocdbt").exists()


# -- 4. a concurrent deleter --------------------------------------------------------------------
def test_gc_racing_a_training_runs_retention_fails_no_save(tmp_path):
    """``while :; do stepsafe gc RUN --keep 2; done`` beside a run saving every step with
    keep=2: every save succeeds, and the newest step always restores."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    stop = threading.Event()
    errors: list[BaseException] = []

    def gc_loop() -> None:
        while not stop.is_set():
            try:
                gc(str(run), keep=2)
            except BaseException as e:  # reported below
                errors.append(e)
                return

    big = {"w": np.zeros((64, 1024), np.float32)}  # several files' worth of deleting per step
    thread = threading.Thread(target=gc_loop)
    thread.start()
    try:
        with manager(ckpts, keep=2) as m:
            for step in range(1, 61):
                assert m.save(step, {**big, "step": step})
                assert m.restore(step)["step"] == step
                assert stepsafe.restore(str(run))["step"] == step
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert len([p for p in ckpts.iterdir() if step_number(p.name) is not None]) <= 3


def test_deleting_a_step_that_vanishes_meanwhile_is_no_error(tmp_path):
    ckpts = save_steps(tmp_path / "run", 1)
    storage = LocalStorage()
    shutil.rmtree(ckpts / "1")
    delete_checkpoint(storage, str(ckpts / "1"))  # already gone: the outcome asked for
    save_steps(tmp_path / "run", 2)
    (ckpts / "2" / "_CHECKPOINT_METADATA").unlink()  # another deleter got as far as this
    delete_checkpoint(storage, str(ckpts / "2"))
    assert not (ckpts / "2").exists()


# -- 5. keep the newest intact steps ------------------------------------------------------------
def damage_manifest(step_dir: Path) -> None:
    (manifest,) = (step_dir / "items").glob("manifest.*.json")
    raw = bytearray(manifest.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    manifest.write_bytes(bytes(raw))


def test_gc_keeps_the_newest_intact_steps_when_the_newest_is_damaged(tmp_path, capsys):
    run = tmp_path / "run"
    ckpts = save_steps(run, 1, 2, 3)
    damage_manifest(ckpts / "3")
    assert statuses(run)["3"] == "Damaged"
    code, out, _ = cli(capsys, "gc", run, "--keep", "1", "--json")
    doc = json.loads(out)
    assert code == 0 and [a["step"] for a in doc["delete"]] == [1]
    assert "damaged" in {a["step"]: a["reason"] for a in doc["keep"]}[3]
    assert names(ckpts) == ["2", "3"]
    assert stepsafe.restore(str(ckpts / "2"))["step"] == 2
    code, out, _ = cli(capsys, "ls", run)
    assert "Damaged" in out and "Latest checkpoint: Step 2" in out


def test_retention_keeps_damaged_steps_and_does_not_count_them(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="stepsafe")
    ckpts = tmp_path / "run" / "checkpoints"
    with manager(ckpts, keep=2) as m:
        m.save(1, state(1))
        m.save(2, state(2))
        damage_manifest(ckpts / "2")
        m.save(3, state(3))
        assert names(ckpts) == ["1", "2", "3"]  # 1, 3 intact
        m.save(4, state(4))
    assert names(ckpts) == ["2", "3", "4"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(ckpts / "2") in errors[0].getMessage()
    assert "damaged" in errors[0].getMessage()


# -- 6. steps whose deletion was cut short ------------------------------------------------------
def test_half_deleted_steps_are_removed_at_start_and_by_gc_unless_not_all_ours(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="stepsafe")
    run = tmp_path / "run"
    ckpts = save_steps(run, 1, 2, 3, 4, 5)
    for step in (1, 2, 5):  # a kill during retention; 5 is newer than the newest intact
        (ckpts / str(step) / "_CHECKPOINT_METADATA").unlink()
    (next((ckpts / "1" / "items").glob("*.data"))).unlink()
    (ckpts / "2" / "notes.txt").write_text("mine")
    plan = gc(str(run), keep=5, dry_run=True)
    assert [a.entry.name for a in plan.delete] == ["1"]
    assert "notes.txt" in {a.entry.name: a.reason for a in plan.keep}["2"]
    manager(ckpts, keep=0).close()
    assert names(ckpts) == ["2", "3", "4", "5"]
    assert f"interrupted deletion: {ckpts / '1'}" in caplog.text
    assert (ckpts / "2" / "notes.txt").read_text() == "mine"


class Position:
    """A data iterator: the manager saves its state as an extra file of each step."""

    def __init__(self, at: int) -> None:
        self.at = at

    def get_state(self) -> dict:
        return {"at": self.at}

    def set_state(self, state: dict) -> None:
        self.at = state["at"]


def test_a_step_with_the_extra_files_its_commit_names_is_deleted_whole(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    with manager(ckpts, keep=2) as m:
        for step in (1, 2, 3, 4):
            m.save(step, state(step), data_iterator=Position(step))
    assert names(ckpts) == ["3", "4"] and list((ckpts / "3").glob("iter/*"))
    plan = gc(str(tmp_path / "run"), keep=1)
    assert [a.entry.name for a in plan.delete] == ["3"] and names(ckpts) == ["4"]


def test_a_deletion_cut_short_leaves_a_step_that_start_up_removes(tmp_path, monkeypatch):
    """The marker goes first, then the extra files: what is left has the items/ files that make
    a step without a commit recognisably ours (its extra files alone might be a user's)."""
    ckpts = tmp_path / "run" / "checkpoints"
    with manager(ckpts, keep=0) as m:
        for step in (1, 2):
            m.save(step, state(step), data_iterator=Position(step))

    def killed(self, path):
        raise KeyboardInterrupt  # killed before the items/ files go

    monkeypatch.setattr(LocalStorage, "delete_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        delete_checkpoint(storage_for(str(ckpts))[0], str(ckpts / "1"))
    monkeypatch.undo()
    left = [p.relative_to(ckpts / "1").as_posix() for p in (ckpts / "1").rglob("*.*")]
    assert left and all(p.startswith("items/") for p in left), left
    assert statuses(tmp_path / "run")["1"] == "Incomplete"
    manager(ckpts, keep=0).close()
    assert names(ckpts) == ["2"]


def test_a_step_without_a_commit_is_ours_only_if_its_extra_files_match_its_items(tmp_path):
    ckpts = save_steps(tmp_path / "run", 1, 2, 3)
    for step in (1, 2):
        (ckpts / str(step) / "_CHECKPOINT_METADATA").unlink()
    (save_id,) = {p.name.split(".")[1] for p in (ckpts / "1" / "items").glob("manifest.*")}
    (ckpts / "1" / "iter").mkdir()
    (ckpts / "1" / "iter" / f"process_0.{save_id}.json").write_text("{}")  # its own save's
    (ckpts / "2" / "export.1a2b3c4d.onnx").write_text("mine")  # a content hash, as tools write
    plan = gc(str(tmp_path / "run"), keep=1)
    assert [a.entry.name for a in plan.delete] == ["1"]
    assert "export.1a2b3c4d.onnx" in {a.entry.name: a.reason for a in plan.keep}["2"]
    assert (ckpts / "2" / "export.1a2b3c4d.onnx").read_text() == "mine"
    assert names(ckpts) == ["2", "3"]


# -- 7. names and errors ------------------------------------------------------------------------
def test_only_ascii_decimal_names_are_steps(tmp_path, capsys):
    assert [step_number(n) for n in ("0", "12", "²", "٣", "007", "1e3", "")] == [
        0, 12, None, None, None, None, None,
    ]  # fmt: skip
    assert is_step_name("300") and not is_step_name("²")
    run = tmp_path / "run"
    ckpts = save_steps(run, 1, 2)
    (ckpts / "²").mkdir()
    (ckpts / "²" / "x").write_text("x")
    for argv in (("ls", run), ("gc", run, "--keep", "1"), ("ls", tmp_path)):
        code, out, err = cli(capsys, *argv)
        assert code == 0 and "Traceback" not in err and "²" not in out, err
    assert (ckpts / "²" / "x").exists() and stepsafe.restore(str(run))["step"] == 2
    with manager(ckpts, keep=1) as m:
        assert m.all_steps() == [2]


def test_gc_on_a_read_only_mount_is_one_line_naming_the_path(tmp_path):
    run = tmp_path / "run"
    save_steps(run, 1, 2)
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount read-only without privileges")
    cmd = (
        f"mount --bind {run} {run} && mount -o remount,bind,ro {run} && "
        f"exec {sys.executable} -m stepsafe.cli.main gc {run} --keep 1"
    )
    p = subprocess.run(["unshare", "-r", "-m", "sh", "-c", cmd], capture_output=True, text=True)
    if "mount" in p.stderr and "stepsafe" not in p.stderr:
        pytest.skip(f"cannot mount here: {p.stderr.strip()}")
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert str(run / "checkpoints" / "1") in lines[0] and "Read-only file system" in lines[0]
    assert (run / "checkpoints" / "1" / "_CHECKPOINT_METADATA").exists()


# -- 8. times with their zone -------------------------------------------------------------------
def test_ls_prints_times_with_their_time_zone(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        run = tmp_path / "run"
        save_steps(run, 1)
        code, out, _ = cli(capsys, "ls", run)
        line = next(x for x in out.splitlines() if x.strip().startswith("1 "))
        assert code == 0 and line.rstrip().endswith(" UTC"), line
        monkeypatch.setenv("TZ", "Asia/Kolkata")
        time.tzset()
        code, out, _ = cli(capsys, "ls", run)
        line = next(x for x in out.splitlines() if x.strip().startswith("1 "))
        assert line.rstrip().endswith((" IST", " +0530")), line
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_every_step_is_listed_with_its_status_in_json(tmp_path, capsys):
    run = tmp_path / "run"
    ckpts = save_steps(run, 1)
    (ckpts / "2").symlink_to(tmp_path / "nowhere")
    code, out, _ = cli(capsys, "ls", run, "--json")
    steps = {s["name"]: s for s in json.loads(out)["runs"][0]["checkpoints"]}
    assert code == 0 and steps["1"]["status"] == "Complete"
    assert steps["2"]["status"] == "Symlink" and "symbolic link" in steps["2"]["detail"]
    assert os.path.islink(ckpts / "2")


@pytest.mark.parametrize("bucket_url", ["memory", "s3"], indirect=True)
def test_on_a_bucket_half_deleted_steps_go_and_orbax_steps_stay(bucket_url):
    storage, _ = storage_for(bucket_url)
    ckpts = f"{bucket_url}/run/checkpoints"
    for step in (1, 2, 3):
        stepsafe.save(f"{ckpts}/{step}", state(step))
    storage.delete_file(storage.join(ckpts, "1", "_CHECKPOINT_METADATA"))  # killed retention
    orbax = {
        "0/_CHECKPOINT_METADATA": json.dumps({"item_handlers": {}, "metrics": {}}).encode(),
        "0/default/_METADATA": b"{}",
        "0/default/manifest.ocdbt": b"\x01",
    }
    for rel, raw in orbax.items():
        storage.fs.pipe_file(storage.join(ckpts, rel), raw)
    manager(ckpts, keep=0).close()
    assert not storage.exists(storage.join(ckpts, "1", "items"))
    plan = gc(f"{bucket_url}/run", keep=1)
    assert [a.entry.step for a in plan.delete] == [2]
    assert {a.entry.step: a.entry.status for a in plan.keep} == {0: "Orbax", 3: "Complete"}
    assert all(storage.exists(storage.join(ckpts, rel)) for rel in orbax)
    assert stepsafe.restore(f"{bucket_url}/run")["step"] == 3
