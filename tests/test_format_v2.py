"""Format version 2, what many processes write: arrays on a regular grid are described once,
their chunks in one part file per process, read only when a restore needs their cells.

A checkpoint saved by 2 real processes is made once; the tests read it, damage copies of it,
and check that a restoring process reads only the part files of the cells it needs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax_processes
import numpy as np
import pytest

import stepsafe
from stepsafe.errors import ChecksumMismatchError, ManifestError, TruncatedDataError
from stepsafe.format.checksum import checksum
from stepsafe.format.deletion import stray_files
from stepsafe.format.grid import Grid, cell_shape
from stepsafe.format.grid_parts import grid_key, merge_grid_parts
from stepsafe.format.manifest import Chunk
from stepsafe.format.parts import PartLoader, part_json
from stepsafe.format.plan import HostArray
from stepsafe.format.written import WrittenPart
from stepsafe.storage import LocalStorage

jax = pytest.importorskip("jax")

SAVE = """
import sys, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import stepsafe
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
def arr(seed, spec, shape=(64, 256)):
    x = (np.arange(np.prod(shape)) * 3 + seed).astype(np.float32).reshape(shape)
    return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), lambda i: x[i])
tree = {"params": {f"w{i}": arr(i, P("data", "model")) for i in range(3)}}
tree["rep"] = arr(9, P())  # 64 KiB: split between the two processes' replicas
tree["host"] = np.arange(5)
stepsafe.save(sys.argv[1], tree)
print("ok", flush=True)
"""

COUNT = """
import sys, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stepsafe.checkpoint.restore import open_checkpoint, restore_from
from stepsafe.storage import LocalStorage
class Counting(LocalStorage):
    seen = []
    def read_bytes(self, path, limit=None):
        self.seen.append(path.rsplit("/", 1)[-1])
        return super().read_bytes(path, limit)
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
t = {f"w{i}": jax.ShapeDtypeStruct((64, 256), np.float32,
                                   sharding=NamedSharding(mesh, P("data", "model")))
     for i in range(3)}
storage = Counting()
with open_checkpoint(sys.argv[1], storage) as reader:
    back = restore_from(reader, t, select="params")
parts = sorted(n.split(".")[0] for n in storage.seen if n.startswith("part_"))
for i in range(3):
    x = (np.arange(64 * 256) * 3 + i).astype(np.float32).reshape(64, 256)
    for s in back[f"w{i}"].addressable_shards:
        assert np.array_equal(np.asarray(s.data), x[s.index])
print("ok parts read:", ",".join(parts), flush=True)
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("v2") / "1"
    results = jax_processes.run(SAVE, 2, args=lambda i, port: [str(path)], timeout_s=120)
    assert all(r.returncode == 0 for r in results), "\n".join(r.describe() for r in results)
    return path


def _copy(saved: Path, tmp_path: Path) -> Path:
    out = tmp_path / "1"
    shutil.copytree(saved, out)
    return out


def _part(step: Path, process: int) -> Path:
    (found,) = (step / "items").glob(f"part_{process}.*.json")
    return found


def test_a_v2_checkpoint_restores_whole_in_one_process_and_verifies(saved: Path) -> None:
    manifest = json.loads(next((saved / "items").glob("manifest.*.json")).read_text())
    assert manifest["format_version"] == 2 and len(manifest["grids"]) == 2
    back = stepsafe.restore(str(saved))
    for i in range(3):
        want = (np.arange(64 * 256) * 3 + i).astype(np.float32).reshape(64, 256)
        np.testing.assert_array_equal(back["params"][f"w{i}"], want)
    np.testing.assert_array_equal(back["host"], np.arange(5))
    assert stepsafe.verify(str(saved)).ok
    assert stray_files(LocalStorage(), str(saved)) == []  # part files belong to the step


def test_each_process_reads_only_the_part_file_of_its_own_cells(saved: Path) -> None:
    results = jax_processes.run(COUNT, 2, args=lambda i, port: [str(saved)], timeout_s=120)
    everything = "\n".join(r.describe() for r in results)
    assert [r.stdout.strip() for r in results] == [
        "ok parts read: part_0",
        "ok parts read: part_1",
    ], everything


def test_a_damaged_part_file_is_found_by_restore_and_verify(saved: Path, tmp_path: Path) -> None:
    step = _copy(saved, tmp_path)
    part = _part(step, 1)
    raw = bytearray(part.read_bytes())
    raw[10] ^= 1
    part.write_bytes(bytes(raw))
    with pytest.raises(ChecksumMismatchError, match="part file"):
        stepsafe.restore(str(step))
    report = stepsafe.verify(str(step))
    assert not report.ok and any("part file" in p.message for p in report.problems)
    part.unlink()
    with pytest.raises(TruncatedDataError, match=r"part file .* is missing"):
        stepsafe.restore(str(step))


# -- units: the grid, the part loader's checks, the merge's cover --------------------------

SHARDING = {"mesh": {"axis_names": ["data", "model"], "shape": [2, 2]}, "spec": ["data"]}


def test_cell_shape_follows_the_sharding_and_the_replica_split() -> None:
    assert cell_shape(SHARDING, (8, 6), 4, 0) == (2, 6)  # 2 rows of 4, split by 2 replicas
    assert cell_shape(SHARDING, (8, 6), 4, 1 << 20) == (4, 6)  # too small to split
    assert cell_shape(SHARDING, (7, 6), 4, 0) is None  # the mesh does not divide it
    grid = Grid((2, 3), tuple(range(8)))
    assert grid.box(5, (8, 6)) == ((4, 6), (3, 6))
    assert grid.index(((4, 6), (3, 6)), (8, 6)) == 5
    assert grid.index(((4, 6), (2, 5)), (8, 6)) is None
    assert grid.cells_over(((3, 5), (2, 4)), (8, 6)) == [2, 3, 4, 5]


FILE = "process_1.00000.0123456789ab.data"
FILE0 = "process_0.00000.0123456789ab.data"


def _loader(doc: dict, writers=(0, 1)) -> PartLoader:
    raw = json.dumps({"arrays": doc}).encode()
    loader = PartLoader(
        [None, ("part_1.0123456789ab.json", len(raw), checksum(raw))],
        {FILE: 64, FILE0: 64},
        {"w": (Grid((2, 4), writers), (4, 4), 4)},
    )
    loader.read = lambda name, limit: raw
    return loader


def test_a_part_file_is_checked_against_the_grid() -> None:
    good = {"w": [[1, [[FILE, 0, 32, "x"]]]]}
    assert _loader(good).shards("w", [1])[0].chunks == (Chunk(FILE, 0, 32, "x"),)
    for doc, problem in [
        ({"w": [[0, [[FILE, 0, 32, "x"]]]]}, "does not give process 1"),  # another's cell
        ({"w": []}, "does not give process 1"),  # its cell missing
        ({"w": [[1, [[FILE, 0, 16, "x"]]]]}, "wrong byte count"),
        ({"w": [[1, [[FILE, 48, 32, "x"]]]]}, "beyond"),
        ({"w": [[1, [["other.data", 0, 32, "x"]]]]}, "unlisted"),
        ({"w": [[1, [[FILE0, 0, 32, "x"]]]]}, "another process wrote"),
        ({**good, "v": []}, "not in the grid"),
    ]:
        with pytest.raises(ManifestError, match=problem):
            _loader(doc).shards("w", [1])
    loader = _loader(good)
    loader.read = lambda name, limit: part_json({})
    with pytest.raises(ChecksumMismatchError):
        loader.shards("w", [1])


def _cells_part(process: int, cells: list[int]) -> WrittenPart:
    array = HostArray("w", np.dtype(np.float32), (8, 6), [], SHARDING)
    key = grid_key(array, 0)
    assert key is not None
    return WrittenPart(cells={key[0]: cells})


@pytest.mark.parametrize(
    ("cells", "problem"),
    [([[0, 1], [2]], "gaps"), ([[0, 1], [1, 2, 3]], "written twice"), ([[0, 1], [2, 9]], "twice")],
)
def test_a_merge_refuses_cells_written_twice_or_never(cells, problem, monkeypatch) -> None:
    from stepsafe import knobs

    monkeypatch.setattr(knobs, "REPLICA_SLICE_MIN_BYTES", 0)
    arrays = [HostArray("w", np.dtype(np.float32), (8, 6), [], SHARDING)]
    parts = [_cells_part(p, c) for p, c in enumerate(cells)]
    with pytest.raises(ManifestError, match=problem):
        merge_grid_parts(["dict", ["w"], [["leaf"]]], arrays, {}, parts, "0123456789ab")
    ok = [_cells_part(0, [0, 1]), _cells_part(1, [2, 3])]
    doc = json.loads(merge_grid_parts(["dict", ["w"], [["leaf"]]], arrays, {}, ok, "0123456789ab"))
    assert doc["grids"] == [{"cell": [2, 6], "writers": [0, 0, 1, 1]}]
