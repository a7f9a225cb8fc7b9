"""The run layout has one home (checkpoint/run_layout.py), and what an interrupted save leaves
is the storage's to recognise (``Storage.temporary_target``, ``writer_alive``,
``stale_entries``): the run's code never asks which kind of storage it has."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BUCKET_KINDS

import stepsafe
from stepsafe import knobs
from stepsafe.checkpoint.run_layout import (
    CHECKPOINTS_DIR,
    LEASE_FILE,
    is_run_dir,
    step_of,
    step_path,
    step_under,
)
from stepsafe.errors import ConfigError
from stepsafe.manager.gc import gc, plan_gc
from stepsafe.manager.inventory import INCOMPLETE, list_runs, scan_run
from stepsafe.manager.lease_holder import Holder
from stepsafe.storage import LocalStorage, storage_for
from stepsafe.storage.temporaries import TMP_MARK

SRC = Path(__file__).resolve().parents[1] / "src" / "stepsafe"
ABOVE_STORAGE = ("checkpoint", "format", "manager", "cli", "demo", "convert", "config")
buckets = pytest.mark.parametrize("bucket_url", BUCKET_KINDS, indirect=True)

# Starts a save of step 5 through a real local transaction, then dies mid-save.
DIE_MID_SAVE = """
import os, sys
from stepsafe.storage import LocalStorage
t = LocalStorage().transaction(sys.argv[1])
t.write_file("items/manifest.0123abcd.json", [b"{}"])
os._exit(0)
"""

# Names a user may give their own files, close to a local temporary's but not one.
LOOKALIKES = ("5.stepsafe-tmp", "5-stepsafe-tmp-h-1-ab", "notes.stepsafe-tmpl-h-1-ab", "5.tmp")


def local_storage_uses(source: str, where: str) -> list[str]:
    """Where ``source`` imports the local storage's module, tests for its class, or spells a
    local temporary's name itself."""
    found = []
    for node in ast.walk(ast.parse(source, where)):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and (
            node.module == "stepsafe.storage.local"
            or (node.module == "stepsafe.storage" and any(a.name == "local" for a in node.names))
        ):
            found.append(f"{line} imports from {node.module}")
        elif isinstance(node, ast.Import) and any(
            a.name.startswith("stepsafe.storage.local") for a in node.names
        ):
            found.append(f"{line} imports stepsafe.storage.local")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance":
            if "LocalStorage" in ast.unparse(node):
                found.append(f"{line} {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and TMP_MARK in str(node.value):
            found.append(f"{line} spells a local temporary's name")
    return found


def test_nothing_above_storage_asks_which_storage_it_has():
    files = sorted(p for d in ABOVE_STORAGE if (SRC / d).is_dir() for p in (SRC / d).rglob("*.py"))
    names = {str(p.relative_to(SRC)) for p in files}
    assert {"manager/gc.py", "manager/inventory.py", "cli/gc.py", "cli/ls.py"} <= names
    found = [u for p in files for u in local_storage_uses(p.read_text(), str(p.relative_to(SRC)))]
    assert not found, found


def test_the_static_check_finds_what_gc_did_before():
    before = (
        "from stepsafe.storage import LocalStorage, Storage\n"
        "from stepsafe.storage.local import TMP_MARK, writer_alive_here\n"
        "import stepsafe.storage.local\n"
        "local = storage is not None and isinstance(storage, LocalStorage)\n"
        "name = '5.stepsafe-tmp-' + tag\n"
    )
    assert len(local_storage_uses(before, "old.py")) == 4


def _die_mid_save(step_dir: Path) -> Path:
    """The temporary a real save of ``step_dir`` leaves when its process dies."""
    subprocess.run([sys.executable, "-c", DIE_MID_SAVE, str(step_dir)], check=True, timeout=120)
    (tmp,) = [p for p in step_dir.parent.iterdir() if p.name.startswith(step_dir.name + TMP_MARK)]
    return tmp


def test_local_temporaries_belong_to_their_step_and_a_dead_ones_are_stale(tmp_path):
    run = tmp_path / "run"
    ckpts = run / CHECKPOINTS_DIR
    stepsafe.save(ckpts / "1", {"a": np.arange(3)})
    dead = _die_mid_save(ckpts / "5")
    storage = LocalStorage()
    live = storage.transaction(str(ckpts / "6"))  # a save of this process, still running
    try:
        live.write_file("items/manifest.4567cdef.json", [b"{}"])
        for name in LOOKALIKES:
            (ckpts / name).write_bytes(b"mine")
        (ckpts / "7.stepsafe-tmp-otherhost-1-ab12cd34").mkdir()  # another host's: unknown
        # the hook: which step a temporary is for, whether its writer lives, which are stale
        assert storage.temporary_target(dead.name) == "5" and step_of(storage, dead.name) == 5
        assert storage.temporary_target(live.tmp.name) == "6"
        assert storage.writer_alive(str(dead)) is False
        assert storage.writer_alive(str(live.tmp)) is True
        assert storage.writer_alive(str(ckpts / "7.stepsafe-tmp-otherhost-1-ab12cd34")) is None
        assert storage.stale_entries(str(ckpts)) == [str(dead)]
        for name in (*LOOKALIKES, "5", LEASE_FILE):
            assert storage.temporary_target(name) is None, name
            assert storage.writer_alive(str(ckpts / name)) is None, name
        assert str(ckpts / LOOKALIKES[0]) not in storage.stale_entries(str(ckpts), min_age_s=1e-9)
        # what gc and ls make of it: the user's files are no steps, so never listed nor deleted
        other = "7.stepsafe-tmp-otherhost-1-ab12cd34"
        listed = [(e.name, e.status, e.temporary) for e in scan_run(storage, str(run), "run").steps]
        assert listed == [("1", "Complete", False)] + [
            (name, INCOMPLETE, True) for name in (dead.name, live.tmp.name, other)
        ]
        plan = gc(str(run), keep=1)
        assert [(a.entry.name, a.reason) for a in plan.delete] == [
            (dead.name, "incomplete, its writer process is gone")
        ]
        kept = {a.entry.name: a.reason for a in plan.keep}
        assert kept[live.tmp.name] == "incomplete, its writer process is alive on this host"
        assert kept[other] == "incomplete, may be a save in progress"
        assert sorted(p.name for p in ckpts.iterdir()) == sorted(
            ["1", live.tmp.name, other, *LOOKALIKES]
        )
        assert all((ckpts / name).read_bytes() == b"mine" for name in LOOKALIKES)
    finally:
        live.abort()


@buckets
def test_buckets_have_no_temporaries_an_unmarked_step_is_incomplete(bucket_url):
    storage, root = storage_for(bucket_url)
    ckpts = storage.join(root, "run", CHECKPOINTS_DIR)
    stepsafe.save(step_path(storage, ckpts, 1), {"a": np.arange(3)})
    t = storage.transaction(step_path(storage, ckpts, 2))  # a save that died before its commit
    t.write_file("items/manifest.0123abcd.json", [b"{}"])
    lookalike = storage.join(ckpts, "3.stepsafe-tmp-h-1-ab12cd34")
    storage.put_whole(storage.join(lookalike, "notes.txt"), b"mine")
    names = storage.list_dir(ckpts)
    assert {"1", "2", "3.stepsafe-tmp-h-1-ab12cd34"} <= set(names)
    for name in names:
        assert storage.temporary_target(name) is None, name
        assert storage.writer_alive(storage.join(ckpts, name)) is None, name
    assert storage.stale_entries(ckpts) == [] == storage.stale_entries(ckpts, min_age_s=1e-9)
    assert step_of(storage, "3.stepsafe-tmp-h-1-ab12cd34") is None
    assert is_run_dir(storage, storage.join(root, "run"))
    (run,) = list_runs(root).runs
    assert [(e.name, e.status, e.temporary) for e in run.steps] == [
        ("1", "Complete", False),
        ("2", INCOMPLETE, False),
    ]
    assert storage.read_bytes(storage.join(lookalike, "notes.txt")) == b"mine"


def test_keep_below_one_is_a_config_error_naming_the_option(tmp_path):
    stepsafe.save(tmp_path / "run" / CHECKPOINTS_DIR / "1", {"a": np.arange(3)})
    (run,) = list_runs(str(tmp_path)).runs
    with pytest.raises(ConfigError) as e:
        plan_gc(run, 0)
    msg = str(e.value)
    assert "\n" not in msg and "--keep" in msg and "max_num_checkpoints_to_keep" in msg
    with pytest.raises(ConfigError, match="--keep"):
        gc(str(tmp_path / "run"), keep=-1, dry_run=True)
    assert (tmp_path / "run" / CHECKPOINTS_DIR / "1").is_dir()


def test_step_under_names_the_step_whose_directory_holds_a_path():
    d = "s3://b/run/checkpoints"
    assert step_under(d, f"{d}/300/items/process_0.00000.ab12cd34.data") == 300
    assert step_under(d + "/", f"{d}/7/x") == 7
    assert step_under(d, f"{d}/{LEASE_FILE}") is None
    assert step_under(d, "s3://b/run/checkpoints2/5/x") is None  # a sibling, not under d
    assert step_under(d, f"{d}/007/x") is None


def test_lease_timeout_is_read_when_a_lease_is_made(monkeypatch):
    monkeypatch.setattr(knobs, "LEASE_TIMEOUT_S", 7.5)
    assert Holder.this_process().timeout_s == 7.5
    assert Holder("h", 1, "t", 0.0).timeout_s == 7.5
    raw = b'{"host": "h", "pid": 1, "token": "t", "renewed_unix": 0}'
    assert Holder.parse(raw).timeout_s == 7.5


@pytest.mark.parametrize("step", [-5, 2.0, True, "7", None])
def test_a_step_no_listing_would_count_is_refused_before_anything_is_written(tmp_path, step):
    """A save as step -5 used to write a directory named "-5" that ls, latest and resume all
    pass by: a checkpoint the run could never find again."""
    import numpy as np

    from stepsafe import CheckpointManager, ConfigError, ManagerOptions

    with CheckpointManager(tmp_path / "ck", ManagerOptions(save_interval_steps=1)) as m:
        with pytest.raises(ConfigError, match="non-negative integer"):
            m.save(step, {"w": np.ones(2)}, force=True)
        assert m.save(np.int64(3), {"w": np.ones(2)}, force=True)
        assert m.save(np.array(4), {"w": np.ones(2)})  # a 0-d integer array, as state.step
        m.wait_until_finished()
        assert m.all_steps() == [3, 4]
    with CheckpointManager(tmp_path / "off", ManagerOptions(enable_checkpointing=False)) as m:
        assert m.save(step, {"w": np.ones(2)}, force=True) is False  # disabled: never refuses
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if not p.name.startswith("_")) == [
        "3",
        "4",
    ]
