"""Adversarial review of the conversion code (#15 items 1, 2, 7): ``stepsafe.convert``
(stacking, write_tree, lazy leaves, param-only, load_parameters) and the format layer's
lazy shards. Breaks are ``xfail(strict=True)`` with the cause and fix; the other tests show
defences that held. Real files, a real two-process save for the v2 source."""

from __future__ import annotations

import os
from pathlib import Path

import jax_processes
import ml_dtypes
import numpy as np
import pytest
from trees import assert_bit_exact

import stepsafe
from stepsafe import ConfigError, StepsafeError
from stepsafe.checkpoint.own_shards import DESCRIPTOR, own_snapshot, write_own
from stepsafe.convert import convert_checkpoint, load_parameters, stack_layers, unstack_layers
from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.convert.source import open_source, source_tree
from stepsafe.convert.write_tree import write_tree
from stepsafe.errors import ManifestError, TargetMismatchError
from stepsafe.format import CommitRecord
from stepsafe.format.plan import LazyShard
from stepsafe.storage import storage_for

F32 = np.float32


def _committed(path: Path) -> bool:
    return path.exists() and any(path.rglob("manifest*.json"))


# -- breaks ---------------------------------------------------------------------------------


def test_a_cast_to_int4_is_refused_as_not_floating(tmp_path):
    stepsafe.save(str(tmp_path / "s"), {"params": {"w": np.linspace(-3, 3, 8, dtype=F32)}})
    with pytest.raises(ConfigError, match="not a floating type"):
        convert_checkpoint(str(tmp_path / "s"), str(tmp_path / "d"), dtype="int4")
    assert not _committed(tmp_path / "d")


def test_unstack_next_to_an_existing_layers_0_loses_nothing(tmp_path):
    src = {
        "params": {
            "layers": {"w": np.arange(6, dtype=F32).reshape(2, 3)},
            "layers_0": {"w": np.full(3, 7, F32)},
        }
    }
    stepsafe.save(str(tmp_path / "s"), src)
    with pytest.raises(ConfigError):
        convert_checkpoint(str(tmp_path / "s"), str(tmp_path / "d"), unstack=True, scan_axis=0)
    assert not _committed(tmp_path / "d")


def test_stack_refuses_layers_whose_values_differ(tmp_path):
    src = {
        "params": {
            "layers_0": {"w": np.zeros(3, F32), "act": "silu"},
            "layers_1": {"w": np.ones(3, F32), "act": "gelu"},
        }
    }
    stepsafe.save(str(tmp_path / "s"), src)
    with pytest.raises(ConfigError, match="act"):
        convert_checkpoint(str(tmp_path / "s"), str(tmp_path / "d"), stack=True, scan_axis=0)


def test_stack_refuses_layers_whose_containers_differ(tmp_path):
    src = {"layers_0": {"t": [np.ones(2)]}, "layers_1": {"t": (np.zeros(2),)}}
    stepsafe.save(str(tmp_path / "s"), src)
    with pytest.raises(ConfigError, match="differs"):
        convert_checkpoint(str(tmp_path / "s"), str(tmp_path / "d"), stack=True, scan_axis=0)


def test_stack_keeps_keys_with_slashes_apart(tmp_path):
    layer = {"a/b": {"c": np.zeros(3, F32)}, "a": {"b/c": np.ones(3, F32)}}
    stepsafe.save(str(tmp_path / "s"), {"layers_0": layer, "layers_1": layer})
    convert_checkpoint(str(tmp_path / "s"), str(tmp_path / "d"), stack=True, scan_axis=0)
    got = stepsafe.restore(str(tmp_path / "d"))["layers"]
    np.testing.assert_array_equal(got["a/b"]["c"], np.zeros((2, 3), F32))
    np.testing.assert_array_equal(got["a"]["b/c"], np.ones((2, 3), F32))


def test_unstack_of_zero_layers_is_refused_not_dropped(tmp_path):
    src = {"p": {"layers": {"w": np.zeros((0, 3), F32)}, "o": np.ones(2, F32)}}
    stepsafe.save(str(tmp_path / "s"), src)
    with pytest.raises(ConfigError):
        convert_checkpoint(str(tmp_path / "s"), str(tmp_path / "d"), unstack=True, scan_axis=0)


def test_a_layers_value_elsewhere_does_not_block_unstacking(tmp_path):
    src = {"p": {"layers": {"w": np.arange(6, dtype=F32).reshape(2, 3)}}, "config": {"layers": 4}}
    stepsafe.save(str(tmp_path / "s"), src)
    done = convert_checkpoint(str(tmp_path / "s"), str(tmp_path / "d"), unstack=True, scan_axis=0)
    assert done.layer_sets == 1
    assert stepsafe.restore(str(tmp_path / "d"))["config"] == {"layers": 4}


def test_a_cast_leaves_complex_arrays_alone_and_refuses_a_complex_dtype(tmp_path):
    c = np.array([1 + 2j, -3.5j], np.complex64)
    stepsafe.save(str(tmp_path / "s"), {"c": c, "w": np.ones(2, F32)})
    convert_checkpoint(str(tmp_path / "s"), str(tmp_path / "d"), dtype="bfloat16")
    assert_bit_exact(stepsafe.restore(str(tmp_path / "d"))["c"], c)
    with pytest.raises(ConfigError, match="not a floating type"):
        convert_checkpoint(str(tmp_path / "s"), str(tmp_path / "d2"), dtype="complex64")


def _own_shards_step(path: Path) -> None:
    """A local-tier step as ``own_shards`` writes it (one process's shards + descriptor)."""
    state = {"params": {"w": np.arange(4, dtype=F32)}, "step": 3}
    snap, desc = own_snapshot(state, copy=True)
    storage, local = storage_for(str(path))
    write_own(storage, local, snap, CommitRecord(step=3), {DESCRIPTOR: desc})


def test_converting_a_local_tier_step_of_one_process_is_refused(tmp_path):
    _own_shards_step(tmp_path / "own")
    assert stepsafe.restore(str(tmp_path / "own"))["step"] == 3  # restore understands it
    with pytest.raises(StepsafeError, match="process"):
        convert_checkpoint(str(tmp_path / "own"), str(tmp_path / "d"), dtype="bfloat16")
    assert not _committed(tmp_path / "d")


# -- defences that held ---------------------------------------------------------------------


RICH = {
    "i": np.arange(5, dtype=np.int8),
    "b": np.array([True, False]),
    "c": np.array([1 + 2j], np.complex64),
    "bf": np.arange(3).astype(ml_dtypes.bfloat16),
    "f8": np.arange(3).astype(ml_dtypes.float8_e4m3fn),
    "i4": np.arange(4).astype(ml_dtypes.int4),
    "zd": np.array(2.5),
    "empty": np.zeros((0, 4), F32),
    "be": np.arange(4, dtype=">i4"),
    "nc": np.arange(12.0).reshape(3, 4)[:, ::2],
    "s": "str",
    "n": None,
    "py": 3,
    "pf": 1.25,
    "t": (1, [2, np.ones(2)]),
}


def test_every_kind_of_leaf_converts_bit_exact_and_a_cast_touches_floats_only(tmp_path):
    stepsafe.save(str(tmp_path / "s"), RICH)
    saved = stepsafe.restore(str(tmp_path / "s"))
    convert_checkpoint(str(tmp_path / "s"), str(tmp_path / "same"), data_file_size_bytes=64)
    assert_bit_exact(stepsafe.restore(str(tmp_path / "same")), saved)
    convert_checkpoint(str(tmp_path / "s"), str(tmp_path / "bf"), dtype="bfloat16")
    got = stepsafe.restore(str(tmp_path / "bf"))
    for k in ("i", "b", "i4", "be", "bf"):
        assert_bit_exact(got[k], saved[k], k)
    for k in ("f8", "zd", "empty", "nc"):
        assert got[k].dtype == ml_dtypes.bfloat16, k
        np.testing.assert_array_equal(got[k].astype(np.float64), saved[k].astype(np.float64))
    assert (got["s"], got["n"], got["py"], got["pf"]) == ("str", None, 3, 1.25)


def test_odd_layer_trees_round_trip_bit_exact_after_group_sorting(tmp_path):
    rng = np.random.default_rng(0)
    params = {
        "emb": rng.standard_normal((5, 4)).astype(F32),
        "enc": {"layers": {"w": rng.standard_normal((4, 12, 3)).astype(F32), "act": "silu"}},
        "mid": np.arange(7, dtype=np.int16),
        "dec": [
            {
                "layers": {
                    "k": rng.integers(-9, 9, (2, 12, 5)).astype(np.int8),
                    "t": (rng.standard_normal((3, 12)).astype(ml_dtypes.bfloat16),),
                }
            }
        ],
        "tail": np.ones(3, bool),
    }
    stepsafe.save(str(tmp_path / "s"), {"params": params, "opt": {"m": np.ones(2)}, "step": 9})
    saved = stepsafe.restore(str(tmp_path / "s"))["params"]
    done = convert_checkpoint(
        str(tmp_path / "s"), str(tmp_path / "u"), param_only=True, unstack=True, scan_axis=1,
        data_file_size_bytes=200,
    )  # fmt: skip
    assert (done.step, done.layer_sets) == (0, 2)
    flat = stepsafe.restore(str(tmp_path / "u"))
    assert list(flat) == ["params"] and len(flat["params"]["enc"]) == 12
    assert list(flat["params"]["enc"])[10] == "layers_10"
    np.testing.assert_array_equal(
        flat["params"]["enc"]["layers_10"]["w"], saved["enc"]["layers"]["w"][:, 10]
    )
    convert_checkpoint(str(tmp_path / "u"), str(tmp_path / "b"), stack=True, scan_axis=1)
    assert_bit_exact(stepsafe.restore(str(tmp_path / "b"))["params"], saved)


def test_gaps_and_mixed_layer_keys_are_refused(tmp_path):
    leaf = OutLeaf((3,), np.dtype(F32), lambda: np.zeros(3, F32))
    with pytest.raises(ConfigError, match="not numbered"):
        stack_layers({"layers_0": {"w": leaf}, "layers_2": {"w": leaf}}, axis=0)
    with pytest.raises(ConfigError, match="both"):
        stack_layers({"layers": {"w": leaf}, "layers_0": {"w": leaf}}, axis=0)
    with pytest.raises(ConfigError, match="differs"):
        other = OutLeaf((4,), np.dtype(F32), lambda: np.zeros(4, F32))
        stack_layers({"layers_0": {"w": leaf}, "layers_1": {"w": other}}, axis=0)
    with pytest.raises(ConfigError, match="no axis"):
        unstack_layers({"layers": {"w": leaf}}, axis=1)
    tree, sets = stack_layers({"layers_0": {"w": leaf}, "layers_00": 1}, axis=0)
    assert sets == 1 and tree["layers_00"] == 1 and tree["layers"]["w"].shape == (1, 3)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (_ for _ in ()).throw(RuntimeError("source gone")), "source gone"),
        (lambda: np.ones(11, F32), "planned"),
        (lambda: np.ones(10, np.int32), "planned"),
        (lambda: np.ones((5, 2), F32).T.reshape(10), None),  # right shape, dtype: accepted
    ],
)
def test_a_failing_make_commits_nothing_and_a_retry_succeeds(tmp_path, make, match):
    dst = tmp_path / "d"
    storage, local = storage_for(str(dst))
    tree = {
        "a": OutLeaf((3000,), np.dtype(F32), lambda: np.ones(3000, F32)),
        "b": OutLeaf((10,), np.dtype(F32), make),
    }
    if match is None:
        write_tree(storage, local, tree, step=1, file_size=1024)
        np.testing.assert_array_equal(stepsafe.restore(str(dst))["b"], np.ones(10, F32))
        return
    with pytest.raises((ManifestError, RuntimeError), match=match):
        write_tree(storage, local, tree, step=1, file_size=1024)
    assert not _committed(dst)
    with pytest.raises(StepsafeError):
        stepsafe.restore(str(dst))
    tree["b"] = OutLeaf((10,), np.dtype(F32), lambda: np.full(10, 2, F32))
    write_tree(storage, local, tree, step=1, file_size=1024)
    np.testing.assert_array_equal(stepsafe.restore(str(dst))["b"], np.full(10, 2, F32))


def test_a_lazy_leaf_spanning_several_data_files_is_made_once(tmp_path):
    made = []
    big = np.arange(5000, dtype=F32)
    tree = {
        "x": np.arange(7, dtype=np.int8),
        "a": OutLeaf((5000,), np.dtype(F32), lambda: made.append(1) or big),
        "c": np.ones(3),
    }
    storage, local = storage_for(str(tmp_path / "d"))
    write_tree(storage, local, tree, step=1, file_size=4096)
    assert len(made) == 1
    assert len(list((tmp_path / "d" / "items").glob("*.data"))) >= 5
    got = stepsafe.restore(str(tmp_path / "d"))
    assert_bit_exact(got["a"], big)
    assert_bit_exact(got["x"], tree["x"])


def test_dst_equal_to_src_or_its_items_is_refused_and_src_is_untouched(tmp_path):
    stepsafe.save(str(tmp_path / "s"), {"w": np.arange(3, dtype=F32)})
    for dst in (tmp_path / "s", tmp_path / "s" / "items"):
        with pytest.raises(stepsafe.CheckpointExistsError):
            convert_checkpoint(str(tmp_path / "s"), str(dst), dtype="bfloat16")
    np.testing.assert_array_equal(stepsafe.restore(str(tmp_path / "s"))["w"], np.arange(3))


V2_SAVE = """
import sys, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import stepsafe
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
x = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
w = jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("data", None, "model")),
                                 lambda i: x[i])
stepsafe.save(sys.argv[1], {"params": {"layers": {"w": w}, "b": np.arange(5)}, "step": 2})
print("ok", flush=True)
"""


def test_a_two_process_v2_checkpoint_converts_bit_exact(tmp_path):
    pytest.importorskip("jax")
    src = tmp_path / "v2"
    results = jax_processes.run(V2_SAVE, 2, args=lambda i, port: [str(src)], timeout_s=120)
    assert all(r.returncode == 0 for r in results), "\n".join(r.describe() for r in results)
    assert list((src / "items").glob("part_*.json")), "not a v2 checkpoint"
    x = np.arange(4 * 6 * 8, dtype=F32).reshape(4, 6, 8)
    convert_checkpoint(
        str(src), str(tmp_path / "u"), param_only=True, unstack=True, scan_axis=1,
        data_file_size_bytes=100,
    )  # fmt: skip
    got = stepsafe.restore(str(tmp_path / "u"))["params"]
    for i in range(6):
        assert_bit_exact(got[f"layers_{i}"]["w"], np.ascontiguousarray(x[:, i]))
    assert_bit_exact(got["b"], np.arange(5))


def test_load_parameters_onto_sharded_targets_of_the_other_kind(tmp_path):
    jax = pytest.importorskip("jax")
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    if jax.device_count() < 4:
        pytest.skip("needs 4 CPU devices (conftest sets XLA_FLAGS)")
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    w = np.arange(4 * 3 * 6, dtype=F32).reshape(4, 3, 6)  # 3 layers on axis 1
    stepsafe.save(str(tmp_path / "s"), {"params": {"layers": {"w": w}, "e": np.ones((4, 2), F32)}})
    convert_checkpoint(
        str(tmp_path / "s"), str(tmp_path / "u"), param_only=True, unstack=True, scan_axis=1
    )
    sh = NamedSharding(mesh, P("data", None, "model"))
    stacked = {
        "layers": {"w": jax.ShapeDtypeStruct(w.shape, F32, sharding=sh)},
        "e": jax.ShapeDtypeStruct((4, 2), F32, sharding=NamedSharding(mesh, P("data"))),
    }
    got = load_parameters(str(tmp_path / "u"), stacked, scan_axis=1)
    assert got["layers"]["w"].sharding == sh
    for s in got["layers"]["w"].addressable_shards:
        assert_bit_exact(np.asarray(s.data), w[s.index])
    sl = NamedSharding(mesh, P("data", "model"))
    flat = {f"layers_{i}": {"w": jax.ShapeDtypeStruct((4, 6), F32, sharding=sl)} for i in range(3)}
    flat["e"] = jax.ShapeDtypeStruct((4, 2), F32)
    back = load_parameters(str(tmp_path / "s"), flat, scan_axis=1)
    for i in range(3):
        assert back[f"layers_{i}"]["w"].sharding == sl
        assert_bit_exact(np.asarray(back[f"layers_{i}"]["w"]), np.ascontiguousarray(w[:, i]))
    four = {"layers": {"w": jax.ShapeDtypeStruct((4, 4, 6), F32)}, "e": stacked["e"]}
    with pytest.raises(TargetMismatchError, match="scan_axis"):
        load_parameters(str(tmp_path / "u"), four, scan_axis=1)  # 4 layers wanted, 3 saved
    narrower = {"layers": {"w": jax.ShapeDtypeStruct(w.shape, ml_dtypes.bfloat16)}, "e": flat["e"]}
    with pytest.raises(StepsafeError):
        load_parameters(str(tmp_path / "u"), narrower, scan_axis=1)  # a lossy cast refused


def test_a_conversion_to_an_s3_bucket_commits_and_reads_back(tmp_path, s3_server):
    import servers

    stepsafe.save(str(tmp_path / "s"), {"params": {"layers": {"w": np.arange(12.0).reshape(3, 4)}}})
    dst = f"s3://{servers.BUCKET}/adv-convert-{os.getpid()}/checkpoints/0"
    seen = []
    convert_checkpoint(
        str(tmp_path / "s"), dst, param_only=True, unstack=True, scan_axis=0,
        data_file_size_bytes=64, on_bytes=seen.append,
    )  # fmt: skip
    assert sum(seen) == 96
    got = stepsafe.restore(dst)["params"]
    assert_bit_exact(got["layers_2"]["w"], np.arange(8.0, 12.0))


LOAD_MEMORY = """
import sys, numpy as np
import stepsafe
from stepsafe.convert import load_parameters
L = 8
stacked = {k: np.full((L, 1024, 1024), i, np.float32) for i, k in enumerate("abcd")}
stepsafe.save(sys.argv[1], {"params": {"layers": stacked}})  # 4 arrays of 32 MiB
del stacked
target = {f"layers_{i}": {k: np.zeros((1024, 1024), np.float32) for k in "abcd"} for i in range(L)}
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) // 1024
import gc; gc.collect()
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
got = load_parameters(sys.argv[1], target, scan_axis=0)
assert float(got["layers_7"]["d"][0, 0]) == 3.0
print(status("VmHWM") - base)
"""


def test_load_parameters_unstacking_holds_one_stacked_array_at_a_time(tmp_path):
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure the peak")
    done = subprocess.run(
        [sys.executable, "-c", LOAD_MEMORY, str(tmp_path / "s")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    peak = int(done.stdout.split()[-1])
    # result 128 MiB + one stacked array 32 MiB + slack; holding every stacked array: ~250
    assert peak < 128 + 32 + 40, f"peak {peak} MiB above the start"


class _Short(LazyShard):
    """A lazy shard that hands back one byte too few."""

    nbytes = 16

    def bytes_at(self, start: int, stop: int) -> memoryview:
        return memoryview(bytes(stop - start - 1))


def test_a_lazy_shard_of_the_wrong_length_commits_nothing(tmp_path):
    from stepsafe.arrays import is_leaf
    from stepsafe.format import write_checkpoint
    from stepsafe.format.plan import HostArray
    from stepsafe.tree import flatten

    flat = flatten({"a": np.zeros(4, F32)}, is_leaf=is_leaf)
    arrays = [HostArray("a", np.dtype(F32), (4,), [(((0, 4),), _Short())])]
    storage, local = storage_for(str(tmp_path / "d"))
    with pytest.raises(ManifestError, match="came out 15 bytes"):
        write_checkpoint(
            storage, local, flat.structure, arrays, {}, record=CommitRecord(step=1), file_size=64
        )
    assert not _committed(tmp_path / "d")


def test_an_interrupted_conversion_to_s3_leaves_nothing_committed(tmp_path, s3_server):
    import servers

    stepsafe.save(str(tmp_path / "s"), {"w": np.arange(3000, dtype=F32), "v": np.ones(9, F32)})
    dst = f"s3://{servers.BUCKET}/adv-interrupt-{os.getpid()}/checkpoints/1"
    storage, local = storage_for(dst)
    with open_source(str(tmp_path / "s")) as reader:
        tree = source_tree(reader)
        w = tree["w"]

        def fail() -> np.ndarray:
            raise OSError("source disk vanished")

        broken = {"w": w, "v": OutLeaf((9,), np.dtype(F32), fail)}
        with pytest.raises(OSError, match="vanished"):
            write_tree(storage, local, broken, step=1, file_size=4096)
        with pytest.raises(StepsafeError):
            stepsafe.restore(dst)
        write_tree(storage, local, tree, step=1, file_size=4096)
    assert_bit_exact(stepsafe.restore(dst), stepsafe.restore(str(tmp_path / "s")))


def test_a_conversion_written_inside_its_source_step_keeps_both_from_gc(tmp_path):
    """dst inside src is accepted; ``stepsafe gc`` then keeps the source step (it holds files
    stepsafe's own record of that step does not name) instead of deleting the conversion."""
    from stepsafe.cli.main import main

    run = tmp_path / "run" / "checkpoints"
    state = {"params": {"layers": {"w": np.arange(6.0).reshape(2, 3)}}, "step": 1}
    stepsafe.save(str(run / "1"), state)
    convert_checkpoint(
        str(run / "1"), str(run / "1" / "inner"), param_only=True, unstack=True, scan_axis=0
    )
    stepsafe.save(str(run / "2"), state)
    assert main(["gc", "--keep", "1", str(tmp_path / "run")]) == 0
    assert_bit_exact(stepsafe.restore(str(run / "1" / "inner"))["params"]["layers_1"]["w"],
                     np.arange(3.0, 6.0))  # fmt: skip
    assert_bit_exact(stepsafe.restore(str(run / "1")), stepsafe.restore(str(run / "2")))


def test_a_run_directory_as_dst_is_refused(tmp_path):
    run = tmp_path / "run"
    stepsafe.save(str(run / "checkpoints" / "5"), {"w": np.ones(3, F32), "step": 5})
    for dst in (run, run / "checkpoints"):
        with pytest.raises(stepsafe.CheckpointExistsError):
            convert_checkpoint(str(run), str(dst), dtype="float16")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]
    assert stepsafe.restore(str(run))["step"] == 5
