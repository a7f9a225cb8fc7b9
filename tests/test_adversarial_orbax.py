"""Orbax checkpoints as other writers and hostile directories leave them: steps written by
``StandardCheckpointer`` (the item at the step's own level), items with names other than
MaxText's, hostile files where Orbax's metadata should be. Each test broke once."""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest

ocp = pytest.importorskip("orbax.checkpoint")
import jax  # noqa: E402
from test_orbax_read import assert_bit_exact, cli, write_manager  # noqa: E402

import stepsafe  # noqa: E402
from stepsafe.errors import CorruptCheckpointError  # noqa: E402
from stepsafe.manager import CheckpointManager, ManagerOptions, load_initial_state  # noqa: E402


def standard_steps(ckpts, steps) -> dict:
    """Steps saved by ``ocp.StandardCheckpointer``: no item directory, the PyTree's files
    (``_METADATA``, ``manifest.ocdbt``, ``ocdbt.process_0/``) in the step directory itself."""
    states = {}
    checkpointer = ocp.StandardCheckpointer()
    for s in steps:
        states[s] = {"w": np.full(3, s, np.float32), "step": np.int32(s)}
        checkpointer.save(ckpts / str(s), states[s])
        checkpointer.wait_until_finished()
    checkpointer.close()
    return states


def test_a_standard_checkpointer_run_reads_its_latest_step_not_ocdbt_process_0(tmp_path):
    states = standard_steps(tmp_path / "run" / "checkpoints", (1, 2))
    assert_bit_exact(stepsafe.restore(str(tmp_path / "run")), states[2])
    assert stepsafe.info(str(tmp_path / "run")).step == 2


def test_a_standard_checkpointer_step_is_its_own_step_whatever_its_siblings(tmp_path):
    ckpts = tmp_path / "checkpoints"
    states = standard_steps(ckpts, (1, 2))
    # an async save of step 3 still running (or killed) beside it: step 2 is complete
    shutil.copytree(ckpts / "2", ckpts / "3.orbax-checkpoint-tmp")
    assert_bit_exact(stepsafe.restore(str(ckpts / "2")), states[2])
    info = stepsafe.info(str(ckpts / "2"))
    assert info.step == 2 and info.path == str(ckpts / "2")


def test_load_parameters_from_an_item_other_than_maxtexts(tmp_path):
    """A step with items ``params`` and ``opt``: the user names ``<step>/params``."""
    ckpts = tmp_path / "run" / "checkpoints"
    params = {"params": {"w": np.arange(3, dtype=np.float32)}}
    with ocp.CheckpointManager(
        ckpts, item_names=("params", "opt"), options=ocp.CheckpointManagerOptions(create=True)
    ) as m:
        m.save(4, args=ocp.args.Composite(
            params=ocp.args.PyTreeSave(params),
            opt=ocp.args.PyTreeSave({"mu": np.zeros(3, np.float32)}),
        ))  # fmt: skip
        m.wait_until_finished()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    with CheckpointManager(str(tmp_path / "new" / "checkpoints"), ManagerOptions()) as m:
        item = str(ckpts / "4" / "params")
        loaded = load_initial_state(m, abstract, load_parameters_path=item)
        assert_bit_exact(loaded.state, params["params"])
        loaded = load_initial_state(m, abstract, load_full_state_path=item)
        assert_bit_exact(loaded.state, params)


def test_ls_lists_the_others_when_an_orbax_steps_metadata_is_a_fifo(tmp_path, capsys):
    ckpts = tmp_path / "run" / "checkpoints"
    write_manager(ckpts, 4, {"w": np.ones(3, np.float32)})
    write_manager(ckpts, 5, {"w": np.ones(3, np.float32)})
    meta = ckpts / "4" / "_CHECKPOINT_METADATA"
    meta.unlink()
    os.mkfifo(meta)
    code, out, err = cli(capsys, "ls", tmp_path, "--json")
    assert code == 0, err
    steps = json.loads(out)["runs"][0]["checkpoints"]
    assert [s["step"] for s in steps] == [4, 5]
    assert os.path.exists(meta)  # left alone


def _refused_without_hanging(fn) -> BaseException | None:
    """``fn()``'s exception, run in a thread that a FIFO cannot hang the test with."""
    box: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # reported to the test
            box[0] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # unblock the reader stuck on the FIFO, then fail
        for fifo in _fifos:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        t.join(10)
        pytest.fail("the read hung on a FIFO")
    return box[0]


_fifos: list[str] = []


def test_a_fifo_in_an_orbax_item_is_refused_not_read(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    write_manager(ckpts, 4, {"w": np.ones(3, np.float32)})
    fifo = ckpts / "4" / "items" / "_METADATA"
    fifo.unlink()
    os.mkfifo(fifo)
    _fifos.append(str(fifo))
    error = _refused_without_hanging(lambda: stepsafe.restore(str(ckpts / "4")))
    assert isinstance(error, CorruptCheckpointError) and "regular file" in str(error)


def test_a_failed_export_leaves_no_temporary_behind(tmp_path):
    """Orbax refuses a zero-size array after making its temporaries (its item directories by a
    thread, once): none may be left, whenever that thread ran."""
    from stepsafe.convert.orbax_out import export_orbax
    from stepsafe.errors import StorageError

    stepsafe.save(str(tmp_path / "src" / "checkpoints" / "1"), {"z": np.zeros((0, 3), np.float32)})
    dst = tmp_path / "dst" / "checkpoints"
    for _ in range(3):
        with pytest.raises(StorageError, match="zero size"):
            export_orbax(str(tmp_path / "src"), str(dst))
        assert sorted(p.name for p in dst.iterdir()) == []


def test_export_never_replaces_an_unfinished_orbax_save_of_its_step(tmp_path):
    from stepsafe.convert.orbax_out import export_orbax
    from stepsafe.errors import CheckpointExistsError

    stepsafe.save(str(tmp_path / "src" / "checkpoints" / "7"), {"w": np.ones(3, np.float32)})
    dst = tmp_path / "maxtext" / "checkpoints"
    write_manager(dst, 7, {"w": np.full(3, 2, np.float32)})
    os.rename(dst / "7", dst / "7.orbax-checkpoint-tmp")  # MaxText's save of 7, still running
    with pytest.raises(CheckpointExistsError, match="unfinished Orbax save of step 7"):
        export_orbax(str(tmp_path / "src"), str(dst))
    assert sorted(p.name for p in dst.iterdir()) == ["7.orbax-checkpoint-tmp"]
    assert (dst / "7.orbax-checkpoint-tmp" / "items" / "_METADATA").exists()


def test_export_beside_stepsafe_steps_warns_that_maxtext_cannot_open_it(tmp_path, caplog):
    """Orbax's own CheckpointManager (MaxText's) fails on a directory holding stepsafe's
    steps; an export there is one MaxText cannot resume from: the user is told."""
    from stepsafe.convert.orbax_out import export_orbax

    dst = tmp_path / "run" / "checkpoints"
    stepsafe.save(str(dst / "10"), {"w": np.ones(3, np.float32)})
    with pytest.raises(ValueError):
        ocp.CheckpointManager(dst, item_names=("items",))  # what the warning is about
    with caplog.at_level("WARNING", logger="stepsafe"):
        export_orbax(str(dst / "10"), str(dst), step=11)
    assert "will not open it" in caplog.text and "(10)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="stepsafe"):
        export_orbax(str(dst / "10"), str(tmp_path / "maxtext" / "checkpoints"))
    assert "will not open it" not in caplog.text


@pytest.mark.parametrize("prefix, length", [("ckpt", None), (None, 6)])
def test_orbax_step_names_with_a_prefix_or_zero_padding(tmp_path, capsys, prefix, length):
    """``CheckpointManagerOptions(step_prefix=..., step_format_fixed_length=...)``: a run
    reads its latest step (8, not 3), a step says its number, ls lists them, gc keeps them."""
    ckpts = tmp_path / "run" / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        create=True, step_prefix=prefix, step_format_fixed_length=length
    )
    states = {s: {"w": np.full(3, s, np.float32)} for s in (3, 8)}
    with ocp.CheckpointManager(ckpts, item_names=("items",), options=options) as m:
        for s, state in states.items():
            m.save(s, args=ocp.args.Composite(items=ocp.args.PyTreeSave(state)))
        m.wait_until_finished()
    assert_bit_exact(stepsafe.restore(str(tmp_path / "run")), states[8])
    assert stepsafe.info(str(tmp_path / "run")).step == 8
    (name,) = [p.name for p in ckpts.iterdir() if p.name.endswith("3")]
    assert stepsafe.info(str(ckpts / name)).step == 3
    stepsafe.save(str(ckpts / "20"), {"w": np.ones(2, np.float32)})  # stepsafe's, beside them
    code, out, _ = cli(capsys, "ls", tmp_path, "--json")
    steps = json.loads(out)["runs"][0]["checkpoints"]
    assert code == 0 and [(s["step"], s["status"]) for s in steps] == [
        (3, "Orbax"), (8, "Orbax"), (20, "Complete")]  # fmt: skip
    before = sorted(p.name for p in ckpts.iterdir())
    code, out, _ = cli(capsys, "gc", tmp_path / "run", "--keep", "1", "--json")
    assert code == 0 and json.loads(out)["delete"] == []
    assert sorted(p.name for p in ckpts.iterdir()) == before


def test_a_damaged_stepsafe_step_is_never_passed_over_for_an_older_orbax_one(tmp_path):
    """stepsafe refuses a run whose latest step is damaged ("restore an earlier step"); an
    Orbax step beside it must not turn that into a silent restore of another step."""
    from stepsafe.errors import ChecksumMismatchError

    ckpts = tmp_path / "run" / "checkpoints"
    write_manager(ckpts, 10, {"w": np.full(3, 10, np.float32)})
    stepsafe.save(str(ckpts / "50"), {"w": np.full(3, 50, np.float32)})
    (manifest,) = (ckpts / "50" / "items").glob("manifest*.json")
    manifest.write_text("garbage")
    from stepsafe.checkpoint.diff import diff

    for path in (tmp_path / "run", ckpts):
        with pytest.raises(ChecksumMismatchError, match="restore an earlier step"):
            stepsafe.restore(str(path))
        with pytest.raises(ChecksumMismatchError):  # not "an Orbax checkpoint"
            diff(str(path), str(ckpts / "50"))
    assert_bit_exact(stepsafe.restore(str(ckpts / "10")), {"w": np.full(3, 10, np.float32)})


def test_converting_a_step_with_maxtexts_iter_item_says_it_is_left_out(tmp_path, caplog):
    """MaxText with Grain saves ``items`` and ``iter`` (the data iterator's position); a
    conversion reads ``items`` alone, and must say so rather than drop ``iter`` silently."""
    from stepsafe.convert import convert_checkpoint

    ckpts = tmp_path / "run" / "checkpoints"
    state = {"params": {"w": np.ones(3, np.float32)}}
    with ocp.CheckpointManager(
        ckpts, item_names=("items", "iter"), options=ocp.CheckpointManagerOptions(create=True)
    ) as m:
        m.save(3, args=ocp.args.Composite(
            items=ocp.args.PyTreeSave(state), iter=ocp.args.JsonSave({"position": 4}),
        ), metrics={"loss": 1.0})  # fmt: skip
        m.wait_until_finished()
    with caplog.at_level("WARNING", logger="stepsafe"):
        convert_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"))
    assert "not iter" in caplog.text and "metrics" not in caplog.text
    assert_bit_exact(stepsafe.restore(str(tmp_path / "out")), state)
