"""Checkpoints written by orbax-checkpoint itself (MaxText's layout and trees), read by stepsafe:
restore whole and selected bit for bit, metadata, targets, Orbax's completeness rules, ls /
inspect / gc, and load_initial_state's load_parameters_path / load_full_state_path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

ocp = pytest.importorskip("orbax.checkpoint")
import jax  # noqa: E402  (after orbax's importorskip: JAX comes with it)

import stepsafe  # noqa: E402
from stepsafe.checkpoint.inspect import ArrayMetadata  # noqa: E402
from stepsafe.cli.main import main  # noqa: E402
from stepsafe.errors import (  # noqa: E402
    IncompleteCheckpointError,
    TargetMismatchError,
    UnsupportedFormatError,
)
from stepsafe.manager import CheckpointManager, ManagerOptions, load_initial_state  # noqa: E402
from stepsafe.manager.inventory import list_runs  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


# -- writers: orbax-checkpoint's own APIs ---------------------------------------------------------
def maxtext_state(seed: int = 0, step: int = 7) -> dict:
    """A small MaxText-like TrainState: ``params/params/decoder/layers/...`` stacked along
    axis 1 (param_scan_axis), bf16 and f32 and int arrays, an optax-like opt_state, a step."""
    rng = np.random.default_rng(seed)

    def f(*shape: int, dtype: type | np.dtype = np.float32) -> np.ndarray:
        return rng.standard_normal(shape).astype(dtype)

    params = {
        "params": {
            "decoder": {
                "layers": {
                    "mlp": {"wi": {"kernel": f(8, 2, 16, dtype=BF16)},
                            "wo": {"kernel": f(16, 2, 8, dtype=BF16)}},
                    "self_attention": {"query": {"kernel": f(8, 2, 2, 4)}},
                },
                "decoder_norm": {"scale": f(8)},
            },
            "token_embedder": {"embedding": f(32, 8, dtype=BF16)},
        }
    }  # fmt: skip
    mu = jax.tree.map(lambda a: np.zeros(a.shape, np.float32) + 0.5, params)
    opt_state = [{"count": np.array(3, np.int32), "mu": mu}, {}]
    return {
        "step": np.array(step, np.int32),
        "params": params,
        "opt_state": opt_state,
        "tokens": np.arange(12, dtype=np.int64).reshape(3, 4),
    }


def write_manager(
    ckpts: Path, step: int, state: dict, *, item: str = "items", async_save: bool = False,
    use_ocdbt: bool = True, use_zarr3: bool = True,
) -> Path:  # fmt: skip
    """``state`` saved as MaxText saves it: ``ocp.CheckpointManager`` with one PyTree item."""
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, create=True)
    with ocp.CheckpointManager(
        str(ckpts), item_names=(item,), item_handlers={item: handler}, options=options
    ) as m:
        assert m.save(step, args=ocp.args.Composite(**{item: ocp.args.PyTreeSave(state)}))
        m.wait_until_finished()
    return ckpts / str(step) if isinstance(ckpts, Path) else None  # type: ignore[return-value]


def orbax_restore(item_dir: Path) -> dict:
    """What orbax-checkpoint itself reads back, as numpy."""
    handler = ocp.PyTreeCheckpointHandler()
    meta = handler.metadata(item_dir).tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    return ocp.Checkpointer(handler).restore(
        item_dir, args=ocp.args.PyTreeRestore(restore_args=args)
    )


def assert_bit_exact(a, b) -> None:
    la, _ = jax.tree_util.tree_flatten_with_path(a)
    lb, _ = jax.tree_util.tree_flatten_with_path(b)
    assert [jax.tree_util.keystr(k) for k, _ in la] == [jax.tree_util.keystr(k) for k, _ in lb]
    for (k, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(k)
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(k)


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- restore and metadata ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "item, async_save, use_ocdbt, use_zarr3",
    [("items", False, True, True), ("items", True, True, False),
     ("default", False, False, False), ("default", True, False, True)],
)  # fmt: skip
def test_restore_whole_and_selected_bit_exact(tmp_path, item, async_save, use_ocdbt, use_zarr3):
    state = maxtext_state()
    run = tmp_path / "run"
    step_dir = write_manager(
        run / "checkpoints", 7, state, item=item, async_save=async_save,
        use_ocdbt=use_ocdbt, use_zarr3=use_zarr3,
    )  # fmt: skip
    for path in (run, run / "checkpoints", step_dir, step_dir / item):
        assert_bit_exact(stepsafe.restore(str(path)), state)
    params = stepsafe.restore(str(run), select="params/params/decoder")
    assert_bit_exact(params, state["params"]["params"]["decoder"])
    count = stepsafe.restore(str(run), select=("opt_state", 0, "count"))
    assert count.dtype == np.int32 and count == 3

    meta = stepsafe.metadata(str(run))
    kernel = meta["params"]["params"]["decoder"]["layers"]["mlp"]["wi"]["kernel"]
    assert kernel == ArrayMetadata((8, 2, 16), BF16, 8 * 2 * 16 * 2)
    assert meta["step"].dtype == np.int32 and meta["opt_state"][1] == {}
    info = stepsafe.info(str(run))
    assert info.step == 7 and info.path == str(step_dir) and info.format.startswith("Orbax")
    assert info.num_arrays == len(jax.tree.leaves(state))


def test_a_selected_subtree_reads_nothing_else(tmp_path):
    """Without OCDBT each leaf has its own directory: with the optimizer state's chunks gone
    (their zarr metadata kept), the parameters still restore: their restore never read them.
    (A restore that does read them fails, but Orbax 0.12 then leaves a tensorstore callback
    aimed at its closed event loop, which Python reports later, in whichever test runs then.)"""
    state = maxtext_state()
    step_dir = write_manager(tmp_path / "checkpoints", 3, state, use_ocdbt=False)
    leaves = [p for p in (step_dir / "items").iterdir() if p.name.startswith("opt_state.")]
    gone = [f for p in leaves for f in p.rglob("*") if f.is_file() and f.name != "zarr.json"]
    assert len(leaves) == 6 and len(gone) >= 6
    for f in gone:
        f.unlink()
    assert_bit_exact(stepsafe.restore(str(step_dir), select="params"), state["params"])
    assert not any(f.exists() for f in gone)


def test_python_scalars_strings_and_none_come_back_as_saved(tmp_path):
    state = {"step": 5, "lr": 0.25, "name": "llama", "flag": True, "none": None,
             "w": np.arange(6, dtype=np.float32)}  # fmt: skip
    write_manager(tmp_path / "checkpoints", 5, state, item="default")
    back = stepsafe.restore(str(tmp_path))
    assert back == {**back, "step": 5, "lr": 0.25, "name": "llama", "flag": True, "none": None}
    assert type(back["step"]) is int and type(back["flag"]) is bool
    assert stepsafe.metadata(str(tmp_path))["name"] == "llama"


def test_restore_onto_a_target_checks_then_places(tmp_path):
    state = maxtext_state()
    write_manager(tmp_path / "checkpoints", 7, state)
    decoder = state["params"]["params"]["decoder"]
    # bfloat16 -> float32 is lossless: allowed; numpy targets give their dtype
    target = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), decoder)
    back = stepsafe.restore(str(tmp_path), target, select="params/params/decoder")
    want = jax.tree.map(lambda a: a.astype(np.float32), decoder)
    assert_bit_exact(back, want)
    # JAX targets are placed on their sharding
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "model"))
    t = {"kernel": jax.ShapeDtypeStruct((8, 2, 16), BF16, sharding=spec)}
    got = stepsafe.restore(str(tmp_path), t, select="params/params/decoder/layers/mlp/wi")
    assert isinstance(got["kernel"], jax.Array) and got["kernel"].sharding == spec
    assert np.asarray(got["kernel"]).tobytes() == decoder["layers"]["mlp"]["wi"]["kernel"].tobytes()
    # refused before anything is read: a lossy cast, a shape, a missing key, a bad select
    lossy = {**state, "tokens": np.zeros((3, 4), np.int32)}
    with pytest.raises(TargetMismatchError, match="int64"):
        stepsafe.restore(str(tmp_path), lossy)
    with pytest.raises(TargetMismatchError, match="shape"):
        stepsafe.restore(str(tmp_path), {"scale": np.zeros(9, np.float32)},
                         select="params/params/decoder/decoder_norm")  # fmt: skip
    with pytest.raises(TargetMismatchError, match="nope"):
        stepsafe.restore(str(tmp_path), select="params/nope")


def test_arrays_saved_from_a_device_mesh_restore_as_numpy(tmp_path):
    """MaxText saves sharded jax.Arrays; without a target they come back whole, as numpy."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
    host = np.arange(64, dtype=np.float32).reshape(8, 8)
    state = {"params": {"w": jax.device_put(host, sharding)}, "step": jax.numpy.int32(4)}
    write_manager(tmp_path / "checkpoints", 4, state)
    back = stepsafe.restore(str(tmp_path))
    w = back["params"]["w"]
    assert isinstance(w, np.ndarray) and w.tobytes() == host.tobytes()
    assert back["step"] == 4


# -- completeness by Orbax's rules, and what the listings say -----------------------------------
def test_an_unfinished_orbax_save_is_refused(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    step_dir = write_manager(ckpts, 7, maxtext_state())
    tmp = ckpts / "7.orbax-checkpoint-tmp-1764535267"  # what a save that died leaves
    step_dir.rename(tmp)
    for path in (tmp, tmp / "items", tmp_path / "run"):
        with pytest.raises(IncompleteCheckpointError, match="orbax-checkpoint-tmp"):
            stepsafe.restore(str(path))
    with pytest.raises(IncompleteCheckpointError):
        stepsafe.metadata(str(tmp))
    # an item still temporary inside a final step
    write_manager(ckpts, 8, maxtext_state())
    (ckpts / "8" / "items").rename(ckpts / "8" / "items.orbax-checkpoint-tmp-17645")
    with pytest.raises(IncompleteCheckpointError, match=r"items\.orbax-checkpoint-tmp"):
        stepsafe.restore(str(ckpts / "8"))
    (r,) = list_runs(str(tmp_path / "run")).runs
    assert {s.name: (s.status, s.orbax_complete) for s in r.steps} == {
        "7.orbax-checkpoint-tmp-1764535267": ("Orbax", False), "8": ("Orbax", False)}  # fmt: skip


def test_ls_inspect_and_gc_show_orbax_steps_and_leave_them_alone(tmp_path, capsys):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for s in (10, 20):
        stepsafe.save(str(ckpts / str(s)), {"step": s, "w": np.ones(4, np.float32)})
    # Orbax 0.12's CheckpointManager cannot open a directory holding stepsafe's steps (it
    # refuses their metadata), so its steps are written beside and moved in
    maxtext = tmp_path / "maxtext"
    write_manager(maxtext, 5, maxtext_state(step=5))
    write_manager(maxtext, 9, maxtext_state(step=9))
    write_manager(tmp_path / "single", 30, maxtext_state(step=30), item="default")
    (tmp_path / "single" / "30").rename(maxtext / "30")
    for name, to in (("5", "5"), ("30", "30"), ("9", "9.orbax-checkpoint-tmp-123")):
        (maxtext / name).rename(ckpts / to)

    code, out, _ = cli(capsys, "ls", run, "--json")
    steps = {c["name"]: c for c in json.loads(out)["runs"][0]["checkpoints"]}
    assert code == 0 and steps["5"]["status"] == "Orbax" and steps["5"]["orbax_complete"]
    assert steps["30"]["orbax_complete"] and "complete by Orbax's rules" in steps["30"]["detail"]
    assert steps["9.orbax-checkpoint-tmp-123"]["orbax_complete"] is False
    assert json.loads(out)["runs"][0]["latest_step"] == 20  # Orbax's never count as ours
    code, out, _ = cli(capsys, "ls", run)
    assert "Orbax (incomplete)" in out and "Incomplete " not in out

    code, out, _ = cli(capsys, "inspect", ckpts / "30")
    assert code == 0 and "Format: Orbax (item default, zarr3)" in out and "Step: 30" in out
    assert "Training Checkpoint" in out and "token_embedder" in out
    code, out, _ = cli(capsys, "inspect", ckpts / "5" / "items", "--json")
    assert json.loads(out)["format"].startswith("Orbax") and json.loads(out)["step"] == 5

    code, out, _ = cli(capsys, "gc", run, "--keep", "1", "--json")
    assert code == 0 and [a["step"] for a in json.loads(out)["delete"]] == [10]
    with CheckpointManager(str(ckpts), ManagerOptions(save_interval_steps=1, max_to_keep=1)) as m:
        m.save(40, {"step": 40, "w": np.ones(4, np.float32)})
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("_")) == [
        "30", "40", "5", "9.orbax-checkpoint-tmp-123"]  # fmt: skip
    assert_bit_exact(orbax_restore(ckpts / "5" / "items"), maxtext_state(step=5))


# -- loading at start-up ------------------------------------------------------------------------
def test_load_parameters_and_full_state_from_an_orbax_checkpoint(tmp_path):
    state = maxtext_state()
    write_manager(tmp_path / "maxtext" / "checkpoints", 7, state)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    with CheckpointManager(str(tmp_path / "new" / "checkpoints"), ManagerOptions()) as m:
        loaded = load_initial_state(m, abstract, load_parameters_path=str(tmp_path / "maxtext"))
        assert loaded.source == "parameters" and loaded.path.endswith("checkpoints/7")
        assert_bit_exact(loaded.state, state["params"])
        loaded = load_initial_state(
            m, abstract, load_parameters_path=str(tmp_path / "maxtext"),
            load_parameters=stepsafe.convert.load_parameters,
        )  # fmt: skip
        assert_bit_exact(loaded.state, state["params"])
        loaded = load_initial_state(m, abstract, load_full_state_path=str(tmp_path / "maxtext"))
        assert loaded.source == "full_state"
        jax32 = {**state, "tokens": state["tokens"].astype(np.int32)}  # JAX without x64
        assert_bit_exact(loaded.state, jax32)


def test_load_parameters_unstacks_an_orbax_checkpoint_for_an_unrolled_model(tmp_path):
    state = maxtext_state()
    write_manager(tmp_path / "checkpoints", 7, state)
    layers = state["params"]["params"]["decoder"]["layers"]
    per_layer = [jax.tree.map(lambda a, i=i: np.take(a, i, axis=1), layers) for i in range(2)]
    decoder = {f"layers_{i}": p for i, p in enumerate(per_layer)}
    decoder["decoder_norm"] = state["params"]["params"]["decoder"]["decoder_norm"]
    want = {"params": {"decoder": decoder,
                       "token_embedder": state["params"]["params"]["token_embedder"]}}  # fmt: skip
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), want)
    got = stepsafe.convert.load_parameters(str(tmp_path), target, scan_axis=1)
    assert_bit_exact(got, want)


# -- without the extra --------------------------------------------------------------------------
def test_without_orbax_checkpoint_a_one_line_error_names_the_extra(tmp_path, monkeypatch, capsys):
    write_manager(tmp_path / "checkpoints", 7, maxtext_state())
    for name in [n for n in sys.modules if n == "orbax" or n.startswith("orbax.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "orbax", None)  # import orbax -> ImportError
    with pytest.raises(UnsupportedFormatError, match=r"pip install 'stepsafe\[orbax\]'"):
        stepsafe.restore(str(tmp_path))
    code, out, err = cli(capsys, "inspect", tmp_path)
    assert code == 5 and "stepsafe[orbax]" in err
    code, out, err = cli(capsys, "convert", tmp_path, tmp_path / "x", "--to", "orbax")
    assert code != 0 and "stepsafe[orbax]" in err and not (tmp_path / "x").exists()
    code, out, _ = cli(capsys, "ls", tmp_path, "--json")  # listing needs no Orbax
    assert code == 0 and json.loads(out)["runs"][0]["checkpoints"][0]["status"] == "Orbax"


def test_verify_and_diff_refuse_an_orbax_step_saying_why(tmp_path, capsys):
    from stepsafe.checkpoint.diff import diff

    ckpts = tmp_path / "run" / "checkpoints"
    write_manager(ckpts, 7, maxtext_state())
    stepsafe.save(str(ckpts / "9"), {"a": np.arange(3)})  # a stepsafe step beside it
    for path in (ckpts / "7", ckpts / "7" / "items"):
        with pytest.raises(UnsupportedFormatError, match="Orbax checkpoint: it has no stepsafe"):
            stepsafe.verify(str(path))
        with pytest.raises(UnsupportedFormatError, match="convert it first"):
            diff(str(path), str(ckpts / "9"))
    assert main(["verify", str(tmp_path / "run")]) == 0  # the run's own steps: 9 only
    out = capsys.readouterr().out
    assert "9" in out and "/7" not in out
    assert main(["verify", str(ckpts / "7")]) != 0
    assert "Orbax checkpoint" in capsys.readouterr().err
