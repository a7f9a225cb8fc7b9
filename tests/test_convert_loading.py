"""``load_parameters_path`` takes either kind: parameters whose layers are unstacked load into
a stacked model (and the reverse, in the library), converted while loading, bit for bit; a
checkpoint that fits neither way is a clear error. Real files; the demo trainer in process."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import stepsafe
from stepsafe.config import load_config
from stepsafe.convert import convert_checkpoint, load_parameters
from stepsafe.errors import TargetMismatchError


def params_at(axis: int) -> dict:
    rng = np.random.default_rng(axis)
    stacked = (3, 4) if axis == 0 else (4, 3)  # 3 layers, on ``axis``
    w = rng.standard_normal((*stacked, 5)).astype(np.float32)
    return {
        "emb": rng.standard_normal((10, 4)).astype(np.float32),
        "decoder": {
            "layers": {"w": w, "b": rng.integers(0, 9, stacked)},
            "norm": np.ones(4, np.float32),
        },
    }


@pytest.mark.parametrize("axis", [0, 1])
def test_unstacked_parameters_load_into_a_stacked_model_and_back(tmp_path, axis):
    params = params_at(axis)
    stepsafe.save(str(tmp_path / "full"), {"step": 5, "params": params, "opt": {"m": np.ones(2)}})
    convert_checkpoint(
        str(tmp_path / "full"), str(tmp_path / "flat"), param_only=True, unstack=True,
        scan_axis=axis,
    )  # fmt: skip
    got = load_parameters(str(tmp_path / "flat"), params, scan_axis=axis)
    for k in ("w", "b"):
        np.testing.assert_array_equal(got["decoder"]["layers"][k], params["decoder"]["layers"][k])
        assert got["decoder"]["layers"][k].dtype == params["decoder"]["layers"][k].dtype
    unstacked = stepsafe.restore(str(tmp_path / "flat"))["params"]
    back = load_parameters(str(tmp_path / "full"), unstacked, scan_axis=axis)
    for i in range(params["decoder"]["layers"]["w"].shape[axis]):
        np.testing.assert_array_equal(
            back["decoder"][f"layers_{i}"]["w"], np.take(params["decoder"]["layers"]["w"], i, axis)
        )
    same = load_parameters(str(tmp_path / "full"), params, scan_axis=axis)  # a plain restore
    np.testing.assert_array_equal(same["emb"], params["emb"])


def test_parameters_that_fit_neither_way_are_a_clear_error(tmp_path):
    params = params_at(0)
    stepsafe.save(str(tmp_path / "full"), {"params": params})
    other = {**params, "extra": np.zeros(1)}
    with pytest.raises(TargetMismatchError, match="target keys not in checkpoint: 'extra'"):
        load_parameters(str(tmp_path / "full"), other, scan_axis=0)
    convert_checkpoint(
        str(tmp_path / "full"), str(tmp_path / "flat"), param_only=True, unstack=True, scan_axis=0
    )
    with pytest.raises(TargetMismatchError, match="scan_axis"):
        load_parameters(str(tmp_path / "flat"), params, scan_axis=1)  # the wrong layer axis


def test_the_demo_trainer_starts_from_unstacked_parameters(tmp_path):
    pytest.importorskip("jax")
    from stepsafe.demo.train import train

    base = load_config(
        "examples/configs/demo.yml",
        [f"base_output_directory={tmp_path}", "steps=6", "checkpoint_period=3", "log_period=3"],
    )
    first = train(dataclasses.replace(base, run_name="a"))
    convert_checkpoint(
        str(tmp_path / "a"), str(tmp_path / "p" / "checkpoints" / "0"), param_only=True,
        unstack=True, scan_axis=0,
    )  # fmt: skip
    second = train(
        dataclasses.replace(base, run_name="b", steps=1, load_parameters_path=str(tmp_path / "p"))
    )
    assert second.source == "parameters" and second.start_step == 0
    started = stepsafe.restore(str(tmp_path / "p"))["params"]["decoder"]["layers_1"]
    trained = np.asarray(first.state["params"]["decoder"]["layers"]["attention"]["qkv"]["kernel"])
    np.testing.assert_array_equal(started["attention"]["qkv"]["kernel"], trained[1])
