"""``stepsafe convert`` with Orbax on either side: Orbax checkpoints (written by orbax-checkpoint)
into stepsafe's, whole and param-only, bit for bit; stepsafe's (and Orbax's) out as Orbax's in
MaxText's layout, read back by orbax-checkpoint itself (numpy, and onto a device sharding as
MaxText restores) bit for bit; and what is refused."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

ocp = pytest.importorskip("orbax.checkpoint")
import jax  # noqa: E402
from test_orbax_read import (  # noqa: E402
    assert_bit_exact,
    cli,
    maxtext_state,
    orbax_restore,
    write_manager,
)

import stepsafe  # noqa: E402
from stepsafe.convert import convert_checkpoint  # noqa: E402
from stepsafe.convert.orbax_out import export_orbax  # noqa: E402
from stepsafe.errors import (  # noqa: E402
    CheckpointExistsError,
    StorageError,
    UnsupportedLeafError,
)


def test_orbax_to_stepsafe_whole_and_param_only(tmp_path, capsys):
    state = maxtext_state()
    write_manager(tmp_path / "maxtext" / "checkpoints", 7, state, async_save=True)
    done = convert_checkpoint(
        str(tmp_path / "maxtext"), str(tmp_path / "full" / "checkpoints" / "7")
    )
    assert done.step == 7
    assert_bit_exact(stepsafe.restore(str(tmp_path / "full")), state)

    code, out, _ = cli(
        capsys, "convert", tmp_path / "maxtext", tmp_path / "params" / "checkpoints" / "0",
        "--param-only", "--no-progress",
    )  # fmt: skip
    assert code == 0 and "step 0, param-only" in out
    assert_bit_exact(stepsafe.restore(str(tmp_path / "params")), {"params": state["params"]})

    code, out, _ = cli(
        capsys, "convert", tmp_path / "maxtext", tmp_path / "unstacked" / "checkpoints" / "0",
        "--param-only", "--unstack", "--dtype", "float32", "--no-progress", "--json",
    )  # fmt: skip
    assert code == 0 and json.loads(out)["layer_sets"] == 1
    back = stepsafe.restore(str(tmp_path / "unstacked"), select="params/params/decoder")
    wi = state["params"]["params"]["decoder"]["layers"]["mlp"]["wi"]["kernel"]
    got = back["layers_1"]["mlp"]["wi"]["kernel"]
    assert got.dtype == np.float32 and got.tobytes() == wi[:, 1].astype(np.float32).tobytes()


@pytest.mark.parametrize("use_ocdbt", [True, False])
def test_stepsafe_to_orbax_restored_by_orbax_itself(tmp_path, use_ocdbt):
    state = maxtext_state()
    stepsafe.save(str(tmp_path / "run" / "checkpoints" / "7"), state)
    dst = tmp_path / "maxtext" / "checkpoints"
    done = export_orbax(str(tmp_path / "run"), str(dst), use_ocdbt=use_ocdbt)
    assert done.step == 7 and done.item == str(dst / "7" / "items")
    assert (dst / "7" / "_CHECKPOINT_METADATA").is_file()
    assert_bit_exact(orbax_restore(dst / "7" / "items"), state)
    # MaxText's way: its CheckpointManager, item "items", onto a device sharding
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with ocp.CheckpointManager(str(dst), item_names=("items",)) as m:
        assert m.latest_step() == 7
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
            state["params"],
        )
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=sharding), abstract)
        item = {"params": abstract}
        restored = m.restore(7, args=ocp.args.Composite(items=ocp.args.PyTreeRestore(
            item=item, restore_args={"params": restore_args}, partial_restore=True)))  # fmt: skip
    kernel = restored["items"]["params"]["params"]["decoder"]["layers"]["mlp"]["wi"]["kernel"]
    assert isinstance(kernel, jax.Array) and kernel.sharding == sharding
    want = state["params"]["params"]["decoder"]["layers"]["mlp"]["wi"]["kernel"]
    assert np.asarray(kernel).tobytes() == want.tobytes()
    # and stepsafe reads its own export back
    assert_bit_exact(stepsafe.restore(str(dst)), state)


def test_param_only_bf16_export_and_the_cli(tmp_path, capsys):
    state = maxtext_state()
    stepsafe.save(str(tmp_path / "run" / "checkpoints" / "7"), state)
    dst = tmp_path / "maxtext" / "checkpoints"
    code, out, _ = cli(
        capsys, "convert", tmp_path / "run", dst, "--to", "orbax", "--param-only",
        "--dtype", "bfloat16", "--no-progress",
    )  # fmt: skip
    assert code == 0 and "Orbax, step 0, param-only" in out and str(dst / "0" / "items") in out
    bf16 = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), state["params"])
    assert_bit_exact(orbax_restore(dst / "0" / "items"), {"params": bf16})
    code, out, _ = cli(capsys, "ls", dst.parent, "--json")
    (entry,) = json.loads(out)["runs"][0]["checkpoints"]
    assert entry["status"] == "Orbax" and entry["orbax_complete"]

    # a step that exists is refused, nothing touched; --step chooses another
    before = sorted(p.relative_to(dst) for p in dst.rglob("*"))
    with pytest.raises(CheckpointExistsError):
        export_orbax(str(tmp_path / "run"), str(dst), param_only=True)
    assert sorted(p.relative_to(dst) for p in dst.rglob("*")) == before
    code, out, _ = cli(capsys, "convert", tmp_path / "run", dst, "--to", "orbax", "--step", "3",
                       "--no-progress", "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["step"] == 3
    assert_bit_exact(orbax_restore(dst / "3" / "items"), state)


def test_orbax_to_orbax_and_into_a_run_holding_stepsafe_steps(tmp_path):
    """Orbax 0.12's CheckpointManager refuses a directory with stepsafe's steps in it; the
    export writes its one step without opening the others."""
    state = maxtext_state()
    write_manager(tmp_path / "src", 7, state, item="default", use_zarr3=False)
    dst = tmp_path / "run" / "checkpoints"
    stepsafe.save(str(dst / "10"), {"step": 10, "w": np.ones(3, np.float32)})
    done = export_orbax(str(tmp_path / "src" / "7"), str(dst), param_only=True)
    assert done.step == 0
    assert_bit_exact(orbax_restore(dst / "0" / "items"), {"params": state["params"]})
    assert stepsafe.restore(str(dst / "10"))["step"] == 10


def test_flags_the_orbax_export_does_not_read_are_refused(tmp_path, capsys):
    stepsafe.save(str(tmp_path / "s" / "checkpoints" / "1"), {"w": np.ones(2, np.float32)})
    for extra in (["--conversion-fn", "a:b"], ["--max-shard-bytes", "10"]):
        code, _, err = cli(
            capsys, "convert", tmp_path / "s", tmp_path / "o", "--to", "orbax", *extra
        )
        assert code == 2 and "not read" in err
    code, _, err = cli(capsys, "convert", tmp_path / "s", tmp_path / "o2", "--step", "3")
    assert code == 2 and "read by --to orbax only" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_relative_paths_and_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Orbax itself takes absolute paths only
    state = maxtext_state()
    stepsafe.save("run/checkpoints/7", state)
    export_orbax("run", "maxtext/checkpoints")
    assert_bit_exact(stepsafe.restore("maxtext"), state)
    assert_bit_exact(orbax_restore(tmp_path / "maxtext" / "checkpoints" / "7" / "items"), state)
    # a dtype Orbax cannot store: refused before writing
    stepsafe.save("odd/checkpoints/1", {"t": np.array(["2020-01-01"], "datetime64[D]")})
    with pytest.raises(UnsupportedLeafError, match="'t' is a datetime64"):
        export_orbax("odd", "maxtext/checkpoints")
    # two keys Orbax would store under one name ("a.b"), one silently lost: refused
    stepsafe.save("dots/checkpoints/1", {"a.b": np.ones(2, np.float32), "a": {"b": 1.0}})
    with pytest.raises(UnsupportedLeafError, match=r"would both be Orbax's 'a\.b'"):
        export_orbax("dots", "maxtext/checkpoints")
    # Orbax's own failure (an int beyond 64 bits, which stepsafe holds): its error, no temporary
    stepsafe.save("big/checkpoints/2", {"big": 2**70, "w": np.ones(2, np.float32)})
    with pytest.raises(StorageError, match="orbax-checkpoint could not write"):
        export_orbax("big", "maxtext/checkpoints")
    assert sorted(p.name for p in (tmp_path / "maxtext" / "checkpoints").iterdir()) == ["7"]
