"""Adversarial review of the Hugging Face safetensors code (issue #15, items 3-4): files our
writer makes that the safetensors library must read as we meant, hostile model directories
read through our read path, conversion functions and ``convert.ops`` misused, the CLI's flag
combinations and the trainer's ``source_checkpoint_layout=safetensors``. Real files, real
library, real CLI; the breaks found are strict xfails naming file:line, cause and fix."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import textwrap

import ml_dtypes
import numpy as np
import pytest

import stepsafe
from stepsafe.cli.main import main
from stepsafe.convert import ops
from stepsafe.convert.hf import (
    export_safetensors,
    import_safetensors,
    load_safetensors_parameters,
)
from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.convert.safetensors_files import INDEX, SINGLE, read_safetensors, write_safetensors
from stepsafe.errors import (
    CheckpointExistsError,
    ConfigError,
    CorruptCheckpointError,
    StepsafeError,
    TargetMismatchError,
)

safetensors_numpy = pytest.importorskip("safetensors.numpy")
from safetensors import safe_open  # noqa: E402

FNS = """
import numpy as np
from stepsafe.convert import ops


def to_hf(params):
    return {"w": params["w"], "b": params["b"]}


def from_hf(flat):
    return {"w": flat["w"], "b": flat["b"]}


def renamed(flat):  # every weight used, through items()
    return {k.upper(): v for k, v in flat.items()}


def eager(flat):  # numpy arrays, plain values, nested lists
    return {"w2": np.asarray(flat["w"]) * 2, "n": 3, "l": [flat["b"], 1.5]}


def raises(flat):
    raise RuntimeError("the mapping is wrong")


def reshaped_wrong(flat):
    return {"w": ops.reshape(flat["w"], (5,)), "b": flat["b"]}


def not_a_dict(params):
    return [params["w"]]
"""


def leaf(a: np.ndarray) -> OutLeaf:
    return OutLeaf(a.shape, a.dtype, lambda: a)


def header_of(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return {"length": n, "json": json.loads(f.read(n))}


@pytest.fixture
def fns(tmp_path, monkeypatch):
    """A module of conversion functions, importable as ``adv_hf_fns:<name>``."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "adv_hf_fns.py").write_text(textwrap.dedent(FNS))
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    import importlib

    import adv_hf_fns

    return importlib.reload(adv_hf_fns)


@pytest.fixture
def small(tmp_path):
    """A committed stepsafe checkpoint {params: {w, b}, step} and its HF export."""
    state = {
        "step": 7,
        "params": {
            "w": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.array([1.5, -2.0], np.float32),
        },
    }
    stepsafe.save(str(tmp_path / "ckpt"), state)
    return tmp_path / "ckpt", state


def write_raw(directory, header: dict, data: bytes = b"", length: int | None = None) -> None:
    directory.mkdir()
    raw = json.dumps(header).encode()
    n = len(raw) if length is None else length
    (directory / SINGLE).write_bytes(struct.pack("<Q", n) + raw + data)


# ---------------------------------------------------------------------- writer vs the library


def test_odd_but_valid_tensors_are_read_by_the_library_as_written(tmp_path):
    """Defence: unicode names, 0-d, empty, bool, big-endian, non-contiguous, names out of
    order, a tensor exactly at the limit and tensors larger than it: the library reads each
    bit for bit, every header is padded to 8 bytes, the index matches the files."""
    arrays = {
        "z.last": np.arange(4, dtype=np.float32),  # 16 bytes: exactly the limit
        "é✓漢.weight": np.arange(3, dtype=np.int16),
        "scalar": np.array(2.5, np.float64),
        "empty": np.zeros((0, 4), np.float32),
        "flags": np.array([True, False, True]),
        "big": np.arange(5, dtype=">i4"),
        "strided": np.arange(12, dtype=np.uint16).reshape(3, 4).T,
        "a.first": np.arange(40, dtype=np.uint8),  # larger than the limit: alone
        "bf": np.arange(3).astype(ml_dtypes.bfloat16),
    }
    files = write_safetensors(
        str(tmp_path / "m"), [(k, leaf(v)) for k, v in arrays.items()], max_shard_bytes=16
    )
    index = json.loads((tmp_path / "m" / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in arrays.values())
    got: dict[str, np.ndarray] = {}
    for file in files[:-1]:
        path = tmp_path / "m" / file
        assert (8 + header_of(path)["length"]) % 8 == 0
        with safe_open(str(path), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            assert all(index["weight_map"][k] == file for k in f.keys())  # noqa: SIM118
        got.update(safetensors_numpy.load_file(str(path)))
    assert set(got) == set(index["weight_map"]) == set(arrays)
    for k, v in arrays.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype.newbyteorder("="), k
        np.testing.assert_array_equal(got[k], v)
    ours = dict(read_safetensors(str(tmp_path / "m")))
    for k, v in arrays.items():
        np.testing.assert_array_equal(ours[k].make(), v)


def test_int4_and_other_dtypes_are_refused_clearly_and_nothing_is_written(tmp_path):
    """Defence: a dtype safetensors cannot hold is a ConfigError naming the tensor."""
    for i, dtype in enumerate([ml_dtypes.int4, ml_dtypes.uint4]):
        a = np.arange(4).astype(dtype)
        with pytest.raises(ConfigError, match=r"'q' has dtype .* safetensors cannot hold"):
            write_safetensors(str(tmp_path / f"m{i}"), [("ok", leaf(np.ones(2))), ("q", leaf(a))])
    assert list(tmp_path.iterdir()) == []


def test_a_tensor_named_metadata_is_refused_not_written_unreadable(tmp_path):
    a = np.arange(4, dtype=np.float32)
    try:
        write_safetensors(str(tmp_path / "m"), [("__metadata__", leaf(a))])
    except ConfigError:
        return  # refused: fine
    safetensors_numpy.load_file(str(tmp_path / "m" / SINGLE))  # the library must read it


def test_a_name_that_is_not_unicode_text_is_refused(tmp_path):
    a = np.arange(4, dtype=np.float32)
    try:
        write_safetensors(str(tmp_path / "m"), [("bad\ud800name", leaf(a))])
    except ConfigError:
        return
    safetensors_numpy.load_file(str(tmp_path / "m" / SINGLE))


@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_float8_is_refused_at_write_as_it_would_not_read_back(tmp_path, dtype):
    a = np.arange(6).astype(dtype)  # safetensors' numpy reader cannot read float8
    with pytest.raises(ConfigError, match="cannot hold"):
        write_safetensors(str(tmp_path / "m"), [("f8", leaf(a))])
    assert not (tmp_path / "m").exists()


def test_complex64_the_library_writes_is_read_and_written(tmp_path):
    a = np.array([1 + 2j, -3j], np.complex64)
    (tmp_path / "lib").mkdir()
    safetensors_numpy.save_file({"c": a}, str(tmp_path / "lib" / SINGLE))
    (_name, back), *_ = read_safetensors(str(tmp_path / "lib"))
    np.testing.assert_array_equal(back.make(), a)
    write_safetensors(str(tmp_path / "ours"), [("c", leaf(a))])
    np.testing.assert_array_equal(
        safetensors_numpy.load_file(str(tmp_path / "ours" / SINGLE))["c"], a
    )


# ---------------------------------------------------------------------- hostile directories

HOSTILE = {
    "overlapping offsets": (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
        None,
    ),
    "offsets past the end": (
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
        b"\0" * 4,
        None,
    ),
    "header length huge": ({"a": {}}, b"", 1 << 62),
    "header not json": ({"a": 1}, b"", 3),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_malicious_header_is_a_corrupt_checkpoint_error(tmp_path, case):
    header, data, length = HOSTILE[case]
    write_raw(tmp_path / "m", header, data, length)
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors"):
        [x.make() for _, x in read_safetensors(str(tmp_path / "m"))]


def sharded(tmp_path):
    a = np.arange(4, dtype=np.float32)
    write_safetensors(str(tmp_path / "m"), [("x", leaf(a)), ("y", leaf(a + 1))], max_shard_bytes=16)
    return tmp_path / "m", json.loads((tmp_path / "m" / INDEX).read_text())


def test_an_index_naming_a_missing_file_is_a_corrupt_checkpoint_error(tmp_path):
    """Defence."""
    d, _ = sharded(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError, match="model-00002-of-00002"):
        read_safetensors(str(d))
    (d / INDEX).write_text("[1, 2]")
    with pytest.raises(CorruptCheckpointError, match="not a valid index"):
        read_safetensors(str(d))


def test_an_index_naming_a_tensor_its_file_lacks_is_refused(tmp_path):
    d, index = sharded(tmp_path)
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (d / INDEX).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="ghost"):
        read_safetensors(str(d))


def test_a_weight_in_two_shards_is_refused_not_last_one_wins(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    a = np.arange(4, dtype=np.float32)
    safetensors_numpy.save_file({"x": a}, str(d / "model-00001-of-00002.safetensors"))
    safetensors_numpy.save_file({"x": a + 7}, str(d / "model-00002-of-00002.safetensors"))
    weight_map = {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}
    (d / INDEX).write_text(json.dumps({"metadata": {"total_size": 16}, "weight_map": weight_map}))
    try:
        names = [n for n, _ in read_safetensors(str(d))]
    except CorruptCheckpointError:
        return
    assert names.count("x") == 1


# ---------------------------------------------------------------------- conversion functions


def test_a_function_returning_arrays_values_and_lists_imports(small, fns, tmp_path):
    """Defence: numpy arrays, plain values and lists in the function's tree import as such."""
    ckpt, state = small
    export_safetensors(str(ckpt), str(tmp_path / "hf"), fns.to_hf)
    import_safetensors(str(tmp_path / "hf"), str(tmp_path / "back"), fns.eager)
    back = stepsafe.restore(str(tmp_path / "back"))["params"]
    np.testing.assert_array_equal(back["w2"], state["params"]["w"] * 2)
    assert back["n"] == 3 and back["l"][1] == 1.5
    np.testing.assert_array_equal(back["l"][0], state["params"]["b"])


def test_a_function_that_iterates_items_is_not_called_unmapped(small, fns, tmp_path):
    ckpt, _ = small
    export_safetensors(str(ckpt), str(tmp_path / "hf"), fns.to_hf)
    import_safetensors(str(tmp_path / "hf"), str(tmp_path / "back"), fns.renamed)
    assert set(stepsafe.restore(str(tmp_path / "back"))["params"]) == {"W", "B"}


@pytest.mark.parametrize("name", ["raises", "reshaped_wrong", "not_a_dict"])
def test_a_failing_conversion_function_is_a_clear_cli_error(small, fns, tmp_path, name, capsys):
    ckpt, _ = small
    export_safetensors(str(ckpt), str(tmp_path / "hf"), fns.to_hf)
    direction = ["--to", "safetensors"] if name == "not_a_dict" else ["--from", "safetensors"]
    src = ckpt if name == "not_a_dict" else tmp_path / "hf"
    argv = ["convert", str(src), str(tmp_path / "out"), *direction]
    code = main([*argv, "--conversion-fn", f"adv_hf_fns:{name}", "--no-progress"])
    assert code != 0 and "adv_hf_fns" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- ops misuse


def test_layers_of_a_0d_array_is_a_clear_error():
    """Defence."""
    with pytest.raises(ConfigError, match=r"shape \(\) has no axis 0"):
        ops.layers(np.array(1.0))


@pytest.mark.parametrize("misuse", ["reshape", "stack"])
def test_ops_misuse_is_a_stepsafe_error(misuse):
    a = np.arange(6, dtype=np.float32)
    with pytest.raises(StepsafeError):
        if misuse == "reshape":
            ops.reshape(a, (4,))
        else:
            ops.stack([a, np.arange(5, dtype=np.float32)])


def test_stack_along_an_axis_the_result_lacks_is_refused():
    parts = [np.arange(3, dtype=np.float32), np.arange(3, dtype=np.float32)]
    with pytest.raises(np.exceptions.AxisError):
        np.stack(parts, axis=5)
    with pytest.raises(StepsafeError):
        ops.stack(parts, axis=5)


def test_transpose_with_bad_axes_is_refused_at_once():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    with pytest.raises(StepsafeError):
        ops.transpose(a, (0, 0))


# ---------------------------------------------------------------------- export


def test_export_refuses_an_existing_directory_or_file_and_changes_nothing(small, fns, tmp_path):
    """Defence."""
    ckpt, _ = small
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep").write_text("mine")
    (tmp_path / "file").write_text("mine too")
    for dst in ("dir", "file"):
        with pytest.raises(CheckpointExistsError):
            export_safetensors(str(ckpt), str(tmp_path / dst), fns.to_hf)
    assert (tmp_path / "dir" / "keep").read_text() == "mine"
    assert (tmp_path / "file").read_text() == "mine too"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_export_interrupted_midway_leaves_nothing(small, tmp_path, error):
    """Defence: a tensor's make raising in the second file (after the first is written)
    leaves no directory and no temporary beside it."""
    ckpt, _ = small

    def broken() -> np.ndarray:
        raise error("gone")

    def fn(params):
        return {"w": params["w"], "late": OutLeaf((2,), np.dtype(np.float32), broken)}

    with pytest.raises(error):
        export_safetensors(str(ckpt), str(tmp_path / "hf"), fn, max_shard_bytes=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---------------------------------------------------------------------- CLI flag combinations

COMBOS = {  # flags given with --to/--from that the Hugging Face path never reads
    "to+dtype": (["--to", "safetensors", "--dtype", "bfloat16"], "to_hf"),
    "to+unstack": (["--to", "safetensors", "--unstack"], "to_hf"),
    "from+dtype": (["--from", "safetensors", "--dtype", "bfloat16"], "from_hf"),
    "from+stack": (["--from", "safetensors", "--stack", "--scan-axis", "0"], "from_hf"),
    "fn-without-to": (["--conversion-fn", "adv_hf_fns:to_hf"], None),
    "shard-bytes-without-to": (["--max-shard-bytes", "100"], None),
}


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_flags_the_chosen_path_does_not_read_are_refused(small, fns, tmp_path, combo, capsys):
    ckpt, _ = small
    export_safetensors(str(ckpt), str(tmp_path / "hf"), fns.to_hf)
    flags, fn = COMBOS[combo]
    src = tmp_path / "hf" if "--from" in flags else ckpt
    fn_flags = ["--conversion-fn", f"adv_hf_fns:{fn}"] if fn else []
    argv = ["convert", str(src), str(tmp_path / "out"), *flags, *fn_flags, "--no-progress"]
    assert main(argv) == 2, capsys.readouterr()
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- loading into a model


def test_numpy_arrays_of_the_wrong_shape_do_not_load(small, fns, tmp_path):
    import jax

    ckpt, _ = small
    export_safetensors(str(ckpt), str(tmp_path / "hf"), fns.to_hf)
    target = {
        "w": jax.ShapeDtypeStruct((2, 3), np.float32),
        "b": jax.ShapeDtypeStruct((2,), np.float32),
    }

    def wrong(flat):
        return {"w": np.asarray(flat["w"]).T, "b": np.asarray(flat["b"])[:1]}

    with pytest.raises(TargetMismatchError):
        load_safetensors_parameters(str(tmp_path / "hf"), target, wrong)


def test_the_trainer_names_the_keys_a_wrong_conversion_function_makes(small, fns, tmp_path):
    """Defence: source_checkpoint_layout=safetensors with a function for another model is a
    clear TargetMismatchError naming the keys that do not fit, before any step runs."""
    from stepsafe.config import load_config
    from stepsafe.demo.train import train

    ckpt, _ = small
    export_safetensors(str(ckpt), str(tmp_path / "hf"), fns.to_hf)
    base = load_config("examples/configs/demo.yml", [f"base_output_directory={tmp_path / 'o'}"])
    with pytest.raises(ConfigError, match="checkpoint_conversion_fn"):
        load_config(
            "examples/configs/demo.yml",
            [f"load_parameters_path={tmp_path / 'hf'}", "source_checkpoint_layout=safetensors"],
        )
    config = dataclasses.replace(
        base, steps=1, source_checkpoint_layout="safetensors",
        load_parameters_path=str(tmp_path / "hf"), checkpoint_conversion_fn="adv_hf_fns:from_hf",
    )  # fmt: skip
    with pytest.raises(TargetMismatchError) as e:
        train(config)
    assert "'w'" in str(e.value) or "w" in str(e.value).split()
    assert not os.path.exists(tmp_path / "o" / config.run_name / "checkpoints" / "1")
