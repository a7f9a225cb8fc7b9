"""Each JAX array's saved sharding (mesh axis names and shape, partition spec) is recorded in
the manifest, shown by ``stepsafe.metadata`` and ``stepsafe inspect``, validated as untrusted
input, and used by a restore under several processes whose target carries no sharding.

The in-process tests run on the 4 CPU devices conftest sets up; the restores under several
processes start 2 real jax.distributed processes on 127.0.0.1 (tests/jax_processes.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax_processes
import numpy as np
import pytest

import stepsafe
from stepsafe import ManifestError
from stepsafe.cli.main import main as cli
from stepsafe.format.manifest import Manifest, parse_sharding
from stepsafe.format.merge import merge_parts
from stepsafe.format.plan import HostArray

jax = pytest.importorskip("jax")
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

W = np.arange(32, dtype=np.float32).reshape(8, 4)
B = np.arange(8, dtype=np.int32)


def _grid() -> Mesh:
    return Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))


def _save_sharded(path: Path, nested: bool = False) -> None:
    """``w`` on mesh (data=2, model=2) P('data', None), ``b`` over both axes (both under
    ``grid/`` when ``nested``), ``h`` on the host, ``one`` on a 2-device mesh."""
    mesh = _grid()
    two = Mesh(np.array(jax.devices()[:2]), ("d",))
    grid = {
        "w": jax.device_put(W, NamedSharding(mesh, P("data", None))),
        "b": jax.device_put(B, NamedSharding(mesh, P(("data", "model")))),
    }
    rest = {"one": jax.device_put(W, NamedSharding(two, P("d"))), "h": np.ones(3), "n": 7}
    stepsafe.save(path, {"grid": grid, **rest} if nested else {**grid, **rest})


def _manifest_doc(path: Path) -> dict:
    return json.loads(next((path / "items").glob("manifest.*.json")).read_bytes())


def test_the_saved_sharding_is_in_the_manifest_and_in_metadata(tmp_path):
    _save_sharded(tmp_path / "1")
    arrays = _manifest_doc(tmp_path / "1")["arrays"]
    assert arrays["w"]["sharding"] == {
        "mesh": {"axis_names": ["data", "model"], "shape": [2, 2]},
        "spec": ["data", None],
    }
    assert arrays["b"]["sharding"]["spec"] == [["data", "model"]]
    assert "sharding" not in arrays["h"]  # a host array: no key at all
    meta = stepsafe.metadata(tmp_path / "1")
    assert str(meta["w"].sharding) == "mesh (data=2, model=2) spec P('data', None)"
    assert str(meta["b"].sharding) == "mesh (data=2, model=2) spec P(('data', 'model'))"
    assert str(meta["one"].sharding) == "mesh (d=2) spec P('d')"
    assert meta["h"] == stepsafe.ArrayMetadata((3,), np.dtype(np.float64), 24)
    assert meta["w"].sharding.mesh_shape == (2, 2) and meta["w"].sharding.spec == ("data", None)


def test_a_single_device_array_records_no_sharding(tmp_path):
    stepsafe.save(tmp_path / "1", {"x": jax.numpy.ones(3)})
    assert "sharding" not in _manifest_doc(tmp_path / "1")["arrays"]["x"]
    assert stepsafe.metadata(tmp_path / "1")["x"].sharding is None


def test_inspect_shows_each_arrays_sharding(tmp_path, capsys):
    _save_sharded(tmp_path / "1")
    assert cli(["inspect", str(tmp_path / "1")]) == 0
    out = capsys.readouterr().out
    tree = out.split("Tree")[1]
    line = next(ln for ln in tree.splitlines() if ln.strip().startswith("w "))
    assert line.rstrip().endswith("mesh (data=2, model=2) spec P('data', None)"), out
    assert cli(["inspect", str(tmp_path / "1"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_key = {a["key"]: a for a in doc["arrays"]}
    assert by_key["w"]["sharding"] == {
        "axis_names": ["data", "model"],
        "mesh_shape": [2, 2],
        "spec": ["data", None],
    }
    assert by_key["h"]["sharding"] is None


def test_a_host_only_checkpoint_shows_no_sharding_column(tmp_path, capsys):
    stepsafe.save(tmp_path / "1", {"h": np.ones(3)})
    assert cli(["inspect", str(tmp_path / "1")]) == 0
    assert "Sharding" not in capsys.readouterr().out


GOOD = {"mesh": {"axis_names": ["data", "model"], "shape": [2, 2]}, "spec": ["data", None]}


@pytest.mark.parametrize(
    ("sharding", "problem"),
    [
        ("data", "must be an object"),
        ({"mesh": GOOD["mesh"]}, "must be an object"),
        ({**GOOD, "extra": 1}, "must be an object"),
        ({**GOOD, "mesh": {"axis_names": ["a"]}}, "mesh must be an object"),
        ({**GOOD, "mesh": {"axis_names": ["a", "b"], "shape": [2]}}, "same length"),
        ({**GOOD, "mesh": {"axis_names": ["a", "a"], "shape": [2, 2]}}, "distinct strings"),
        ({**GOOD, "mesh": {"axis_names": [1, "b"], "shape": [2, 2]}}, "distinct strings"),
        ({**GOOD, "mesh": {"axis_names": ["data", "model"], "shape": [2, 0]}}, "positive"),
        ({**GOOD, "mesh": {"axis_names": ["data", "model"], "shape": [2, True]}}, "positive"),
        ({**GOOD, "spec": "data"}, "must be a list"),
        ({**GOOD, "spec": ["data", None, None]}, "at most 2 entries"),
        ({**GOOD, "spec": ["nope", None]}, "names an axis the mesh"),
        ({**GOOD, "spec": [3, None]}, "must be null, an axis name"),
        ({**GOOD, "spec": [["data", 1]]}, "must be null, an axis name"),
        ({**GOOD, "spec": ["data", "data"]}, "uses a mesh axis twice"),
        ({**GOOD, "spec": [["data", "model"], "model"]}, "uses a mesh axis twice"),
    ],
)
def test_a_malformed_sharding_in_a_manifest_is_a_manifest_error(tmp_path, sharding, problem):
    _save_sharded(tmp_path / "1")
    doc = _manifest_doc(tmp_path / "1")
    doc["arrays"]["w"]["sharding"] = sharding
    with pytest.raises(ManifestError, match=rf"array 'w': sharding .*{problem}"):
        Manifest.from_json(json.dumps(doc).encode(), "m.json")
    with pytest.raises(ManifestError, match=rf"array 'w': sharding .*{problem}"):
        merge_parts(["dict", ["w"], [["leaf"]]], [HostArray("w", W.dtype, W.shape, [], sharding)],
                    {}, [], "0" * 12)  # fmt: skip
    assert parse_sharding("w", GOOD, 2) == GOOD


def test_an_older_manifest_without_sharding_reads_as_none(tmp_path):
    _save_sharded(tmp_path / "1")
    doc = _manifest_doc(tmp_path / "1")
    for a in doc["arrays"].values():
        a.pop("sharding", None)
    manifest = Manifest.from_json(json.dumps(doc).encode(), "m.json")
    assert all(a.sharding is None for a in manifest.arrays.values())
    assert b'"sharding"' not in manifest.to_json()


def test_one_process_restores_an_abstract_target_onto_the_default_device(tmp_path):
    _save_sharded(tmp_path / "1")
    tree = {k: None for k in ("b", "one", "h", "n")} | {"w": jax.ShapeDtypeStruct((8, 4), W.dtype)}
    restored = stepsafe.restore(tmp_path / "1", tree)
    assert restored["w"].devices() == {jax.devices()[0]}  # as always: JAX's default device
    np.testing.assert_array_equal(np.asarray(restored["w"]), W)


RESTORE = """
import json, sys
import numpy as np
import jax
import stepsafe
from stepsafe.errors import TargetMismatchError

path = sys.argv[1]
W = np.arange(32, dtype=np.float32).reshape(8, 4)
B = np.arange(8, dtype=np.int32)
wanted = {"w": jax.ShapeDtypeStruct((8, 4), np.float32), "b": jax.ShapeDtypeStruct((8,), np.int32)}
got = stepsafe.restore(path, wanted, select="grid")
for key, full in (("w", W), ("b", B)):
    x = got[key]
    s = x.sharding
    assert isinstance(s, jax.sharding.NamedSharding), (key, s)
    assert dict(s.mesh.shape) == {"data": 2, "model": 2}, s.mesh
    for shard in x.addressable_shards:
        assert np.array_equal(np.asarray(shard.data), full[shard.index]), (key, shard.index)
    print(f"ok {key} {tuple(s.spec)} on {len(s.device_set)} devices", flush=True)
for key, target in (
    ("one", jax.ShapeDtypeStruct((8, 4), np.float32)),
    ("h", jax.ShapeDtypeStruct((3,), np.float64)),
    ("n", jax.ShapeDtypeStruct((), np.int32)),  # an inline value
):
    try:
        stepsafe.restore(path, target, select=key)
        print(f"restored {key}")
    except TargetMismatchError as e:
        print(f"refused {key}: {e}", flush=True)
# a target with a sharding of its own is used as given, on any mesh
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
own = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
x = stepsafe.restore(path, jax.ShapeDtypeStruct((8, 4), np.float32, sharding=own), select="one")
assert x.sharding == own
for shard in x.addressable_shards:
    assert np.array_equal(np.asarray(shard.data), W[shard.index])
print("ok own sharding", flush=True)
"""


def test_two_processes_restore_abstract_targets_onto_the_saved_sharding(tmp_path):
    _save_sharded(tmp_path / "1", nested=True)
    results = jax_processes.run(
        RESTORE, 2, args=lambda i, port: [str(tmp_path / "1")], timeout_s=120
    )
    everything = "\n".join(r.describe() for r in results)
    for r in results:
        assert r.returncode == 0, everything
        lines = r.stdout.splitlines()
        assert "ok w ('data', None) on 4 devices" in lines, everything
        assert "ok b (('data', 'model'),) on 4 devices" in lines, everything
        assert "ok own sharding" in lines, everything
        one = next(ln for ln in lines if ln.startswith("refused one: "))
        assert "'one'" in one and "mesh (d=2)" in one and "4 devices" in one, one
        assert "pass a target with a sharding" in one, one
        for key in ("h", "n"):
            line = next(ln for ln in lines if ln.startswith(f"refused {key}: "))
            assert f"'{key}'" in line and "without a device mesh" in line, line


SAVE_AND_RESTORE = """
import sys
import numpy as np
import jax
import stepsafe
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

path = sys.argv[1]
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
W = np.arange(32, dtype=np.float32).reshape(8, 4)
specs = {"rep": P(), "dp": P(None, "model"), "sh": P("data", "model")}
tree = {k: jax.device_put(W, NamedSharding(mesh, s)) for k, s in specs.items()}
stepsafe.save(path, tree)
meta = stepsafe.metadata(path)
assert str(meta["dp"].sharding) == "mesh (data=2, model=2) spec P(None, 'model')", meta
got = stepsafe.restore(path, {k: jax.ShapeDtypeStruct((8, 4), np.float32) for k in tree})
for k, x in got.items():
    assert x.sharding.is_equivalent_to(tree[k].sharding, 2), (k, x.sharding)
    for s in x.addressable_shards:
        assert np.array_equal(np.asarray(s.data), W[s.index]), (k, s.index)
print("ok", flush=True)
"""


def test_two_processes_save_then_restore_abstract_targets_onto_the_saved_sharding(tmp_path):
    results = jax_processes.run(
        SAVE_AND_RESTORE, 2, args=lambda i, port: [str(tmp_path / "1")], timeout_s=120
    )
    everything = "\n".join(r.describe() for r in results)
    assert all(r.returncode == 0 and "ok" in r.stdout.splitlines() for r in results), everything
    doc = _manifest_doc(tmp_path / "1")
    assert doc["arrays"]["sh"]["sharding"]["spec"] == ["data", "model"]
    # many processes: the array lies on a grid, both processes wrote cells of it
    grid = doc["grids"][doc["arrays"]["sh"]["grid"]]
    assert sorted(set(grid["writers"])) == [0, 1]
