"""Adversarial review of format version 2 (issue #13): hostile manifests and part files, with
consistent checksums, against every reader path and tool.

A checkpoint is saved once by 2 real processes (version 2: a grid, two part files); each test
damages a copy and rewrites the manifest's checksum in ``_CHECKPOINT_METADATA`` (whose own
checksum ``CommitRecord.to_json`` recomputes), so only the format's own checks stand between
the damage and the reader. The review's six breaks (a grid shared by meshes on other
devices, parts claiming each other's bytes, a truncated part counted intact, gc deleting a
listed part, a damaged part read once per array, unallocatable shapes) were fixed; their
tests stay.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import jax_processes
import numpy as np
import pytest
from conftest import BUCKET_KINDS

import stepsafe
from stepsafe.cli.main import main
from stepsafe.errors import CorruptCheckpointError, ManifestError
from stepsafe.format.check import check_checkpoint
from stepsafe.format.checksum import checksum
from stepsafe.format.deletion import foreign_files, has_items, stray_files, walk_step
from stepsafe.format.layout import CommitRecord
from stepsafe.format.reader import CheckpointReader
from stepsafe.storage import LocalStorage

jax = pytest.importorskip("jax")

SAVE = """
import sys, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import stepsafe
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
def arr(k):
    x = (np.arange(128) * 3 + k).astype(np.float32).reshape(8, 16)
    return jax.make_array_from_callback((8, 16), NamedSharding(mesh, P("data", "model")),
                                        lambda i: x[i])
stepsafe.save(sys.argv[1], {"params": {"a": arr(1), "b": arr(2)}, "host": np.arange(5)})
print("ok", flush=True)
"""


def _want(k: int) -> np.ndarray:
    return (np.arange(128) * 3 + k).astype(np.float32).reshape(8, 16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adv_v2") / "1"
    results = jax_processes.run(SAVE, 2, args=lambda i, port: [str(path)], timeout_s=120)
    assert all(r.returncode == 0 for r in results), "\n".join(r.describe() for r in results)
    assert json.loads(_manifest(path).read_text())["format_version"] == 2
    return path


def _copy(saved: Path, tmp_path: Path, step: int = 1) -> Path:
    out = tmp_path / "run" / "checkpoints" / str(step)
    shutil.copytree(saved, out)
    if step != 1:
        record = out / "_CHECKPOINT_METADATA"
        meta = CommitRecord.from_json(record.read_bytes(), str(record))
        meta.step = step
        record.write_bytes(meta.to_json())
    return out


def _manifest(step: Path) -> Path:
    return next((step / "items").glob("manifest.*.json"))


def _part(step: Path, p: int) -> Path:
    return next((step / "items").glob(f"part_{p}.*.json"))


def _commit(step: Path, doc: dict) -> None:
    """Write ``doc`` as the manifest and make the commit record's checksums match it."""
    raw = json.dumps(doc, separators=(",", ":")).encode()
    _manifest(step).write_bytes(raw)
    record = step / "_CHECKPOINT_METADATA"
    meta = CommitRecord.from_json(record.read_bytes(), str(record))
    meta.manifest_checksum = checksum(raw)
    record.write_bytes(meta.to_json())


def _set_part(step: Path, p: int, doc: dict | bytes) -> None:
    """Write part ``p`` and list its size and checksum in the manifest."""
    raw = doc if isinstance(doc, bytes) else json.dumps(doc, separators=(",", ":")).encode()
    path = _part(step, p)
    path.write_bytes(raw)
    manifest = json.loads(_manifest(step).read_text())
    manifest["parts"][p] = [path.name, len(raw), checksum(raw)]
    _commit(step, manifest)


def _cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue() + err.getvalue()


def _assert_refused_everywhere(step: Path) -> None:
    """restore (whole and a subtree) raises a CorruptCheckpointError; verify reports it; the
    command line tools exit with a status, never a traceback."""
    for select in (None, "params/a"):
        with pytest.raises(CorruptCheckpointError):
            stepsafe.restore(str(step), select=select) if select else stepsafe.restore(str(step))
    assert not stepsafe.verify(str(step)).ok
    assert _cli("verify", str(step))[0] != 0
    for argv in (["ls", str(step.parent.parent.parent)], ["inspect", str(step)]):
        _cli(*argv)  # any exit status; raising is the failure
    _cli("inspect", "--json", str(step))


def _grid(d: dict, **kw) -> None:
    d["grids"][0].update(kw)


MANIFESTS: dict[str, Callable[[dict], None]] = {
    "cell 0": lambda d: _grid(d, cell=[0, 8]),
    "cells that do not tile": lambda d: _grid(d, cell=[3, 8]),
    "cell of another rank": lambda d: _grid(d, cell=[4]),
    "a million writers": lambda d: _grid(d, writers=[0] * 1_000_000),
    "writer out of range": lambda d: _grid(d, writers=[0, 0, 1, 2]),
    "negative writer": lambda d: _grid(d, writers=[0, 0, 1, -1]),
    "writer not an int": lambda d: _grid(d, writers=[0, 0, 1, 1.0]),
    "missing grid": lambda d: d["arrays"]["params/a"].update(grid=5),
    "grid null": lambda d: d["arrays"]["params/a"].update(grid=None),
    "grids null": lambda d: d.update(grids=None),
    "parts null": lambda d: d.update(parts=None),
    "parts missing": lambda d: d.pop("parts"),
    "part null where cells exist": lambda d: d["parts"].__setitem__(1, None),
    "part an int": lambda d: d["parts"].__setitem__(1, 7),
    "part a 3-letter string": lambda d: d["parts"].__setitem__(1, "abc"),
    "part name with a slash": lambda d: d["parts"][1].__setitem__(0, "../2/items/part_0.json"),
    "part name ..": lambda d: d["parts"][1].__setitem__(0, ".."),
    "part name of a data file": lambda d: d["parts"][1].__setitem__(0, sorted(d["files"])[1]),
    "part size negative": lambda d: d["parts"][1].__setitem__(1, -1),
    "part size huge": lambda d: d["parts"][1].__setitem__(1, 1 << 62),
    "part size smaller": lambda d: d["parts"][1].__setitem__(1, 10),
    "part checksum not a string": lambda d: d["parts"][1].__setitem__(2, 5),
    "version 1 with a grid": lambda d: d.update(format_version=1),
}


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_a_hostile_v2_manifest_is_refused_by_every_reader(name, saved, tmp_path) -> None:
    step = _copy(saved, tmp_path)
    doc = json.loads(_manifest(step).read_text())
    MANIFESTS[name](doc)
    _commit(step, doc)
    _assert_refused_everywhere(step)


def _first_chunk(d: dict) -> list:
    return d["arrays"]["params/a"][0][1][0]


PARTS: dict[str, Callable[[dict], dict | bytes]] = {
    "a cell twice": lambda d: d["arrays"]["params/a"].append(d["arrays"]["params/a"][0]) or d,
    "cells out of order": lambda d: d["arrays"]["params/a"].reverse() or d,
    "a cell of another process": lambda d: d["arrays"]["params/a"][0].__setitem__(0, 0) or d,
    "a cell missing": lambda d: d["arrays"]["params/a"].pop() and d,
    "chunk offset beyond its file": lambda d: _first_chunk(d).__setitem__(1, 10_000) or d,
    "chunk length lying": lambda d: _first_chunk(d).__setitem__(2, 64) or d,
    "chunk length negative": lambda d: _first_chunk(d).__setitem__(2, -128) or d,
    "chunk offset a float": lambda d: _first_chunk(d).__setitem__(1, 0.0) or d,
    "chunk in an unlisted file": lambda d: _first_chunk(d).__setitem__(0, "../x.data") or d,
    "chunk file a list": lambda d: _first_chunk(d).__setitem__(0, [1]) or d,
    "chunk a dict of 4": lambda d: (
        d["arrays"]["params/a"][0].__setitem__(1, [dict.fromkeys("abcd")]) or d
    ),
    "chunks null": lambda d: d["arrays"]["params/a"][0].__setitem__(1, None) or d,
    "rows null": lambda d: d["arrays"].__setitem__("params/a", None) or d,
    "arrays a list": lambda d: {"arrays": []},
    "an array off the grid": lambda d: d["arrays"].__setitem__("host", []) or d,
    "not JSON": lambda d: b"\xff\xfe{",
    "deeply nested": lambda d: b"[" * 100_000,
}


@pytest.mark.parametrize("name", list(PARTS))
def test_a_hostile_part_file_is_refused_by_every_reader(name, saved, tmp_path) -> None:
    step = _copy(saved, tmp_path)
    _set_part(step, 1, PARTS[name](json.loads(_part(step, 1).read_text())))
    _assert_refused_everywhere(step)


@pytest.mark.parametrize("how", ["symlink", "link to /dev/zero", "bigger", "directory"])
def test_a_part_file_that_is_a_link_bigger_or_a_directory_is_refused(how, saved, tmp_path) -> None:
    step = _copy(saved, tmp_path)
    part = _part(step, 1)
    if how == "symlink":
        moved = tmp_path / "elsewhere.json"
        part.rename(moved)
        part.symlink_to(moved)
    elif how == "link to /dev/zero":
        part.unlink()
        part.symlink_to("/dev/zero")
    elif how == "bigger":
        part.write_bytes(part.read_bytes() + b" " * 10)
    else:
        part.unlink()
        part.mkdir()
    _assert_refused_everywhere(step)


def test_two_part_files_claiming_the_same_bytes_are_refused(saved, tmp_path) -> None:
    step = _copy(saved, tmp_path)
    p0 = json.loads(_part(step, 0).read_text())
    p1 = json.loads(_part(step, 1).read_text())
    for key, rows in p1["arrays"].items():  # process 1's cells, process 0's bytes
        p1["arrays"][key] = [[cell, c0] for (cell, _), (_, c0) in zip(rows, p0["arrays"][key])]
    _set_part(step, 1, p1)
    with pytest.raises(CorruptCheckpointError):
        back = stepsafe.restore(str(step))["params"]["a"]
        assert np.array_equal(back[:4], back[4:])  # rows 4..7 restored as rows 0..3
    assert not stepsafe.verify(str(step)).ok


def test_gc_never_counts_a_step_with_a_truncated_part_file_as_intact(saved, tmp_path) -> None:
    _copy(saved, tmp_path, 1)
    bad = _copy(saved, tmp_path, 2)
    part = _part(bad, 1)
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError):
        stepsafe.restore(str(bad))
    with pytest.raises(CorruptCheckpointError):
        CheckpointReader(LocalStorage(), str(bad)).check_files()
    code, out = _cli("gc", str(tmp_path / "run"), "--keep", "1", "--json")
    assert code == 0 and (tmp_path / "run" / "checkpoints" / "1").is_dir(), out


class _Counting(LocalStorage):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def read_bytes(self, path, limit=None):
        self.seen.append(path.rsplit("/", 1)[-1])
        return super().read_bytes(path, limit)


def test_verify_reads_a_damaged_part_file_once(saved, tmp_path) -> None:
    step = _copy(saved, tmp_path)
    part = _part(step, 1)
    part.write_bytes(part.read_bytes()[:100])
    storage = _Counting()
    report = check_checkpoint(storage, str(step))
    assert not report.ok
    assert sum(n.startswith("part_1.") for n in storage.seen) == 1


# -- what holds ---------------------------------------------------------------------------


def test_tools_on_an_intact_v2_checkpoint(saved, tmp_path) -> None:
    step = _copy(saved, tmp_path)
    np.testing.assert_array_equal(stepsafe.restore(str(step), select="params/b"), _want(2))
    assert stepsafe.metadata(str(step))["params"]["a"].shape == (8, 16)
    for argv in (["ls", str(tmp_path)], ["inspect", str(step)], ["verify", str(step)]):
        assert _cli(*argv)[0] == 0, argv
    code, out = _cli("inspect", "--json", str(step))
    assert code == 0 and json.loads(out)
    assert stray_files(LocalStorage(), str(step)) == []
    walked = walk_step(LocalStorage(), str(step))
    assert foreign_files(walked, None) == []


def test_diff_of_a_v1_and_a_v2_checkpoint_of_the_same_values(saved, tmp_path) -> None:
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    on = NamedSharding(mesh, P("data", "model"))
    tree = {"params": {k: jax.device_put(_want(i), on) for i, k in ((1, "a"), (2, "b"))}}
    tree["host"] = np.arange(5)
    v1 = tmp_path / "v1"
    stepsafe.save(str(v1), tree)
    assert json.loads(_manifest(v1).read_text())["format_version"] == 1
    code, out = _cli("diff", str(v1), str(saved), "--values", "--no-progress", "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert not doc.get("changed") and not doc.get("contents_differ"), out


def test_a_deletion_cut_short_leaves_a_step_recognisably_ours(saved, tmp_path) -> None:
    """delete_checkpoint: marker first, extras, then the tree; whatever is left of items/
    (only part files, say) still marks the step as stepsafe's, so gc may finish it."""
    step = _copy(saved, tmp_path)
    (step / "_CHECKPOINT_METADATA").unlink()
    for f in (step / "items").iterdir():
        if not f.name.startswith("part_"):
            f.unlink()
    walked = walk_step(LocalStorage(), str(step))
    assert has_items(walked) and foreign_files(walked, None) == []


def test_a_grid_array_with_an_empty_and_a_huge_axis_is_refused(saved, tmp_path) -> None:
    step = _copy(saved, tmp_path)
    doc = json.loads(_manifest(step).read_text())
    doc["grids"].append({"cell": [1, 1], "writers": []})
    doc["arrays"]["params/a"].update(shape=[0, 2**62], grid=1)
    doc["arrays"]["params/a"].pop("sharding")
    _commit(step, doc)
    with pytest.raises(CorruptCheckpointError):
        stepsafe.restore(str(step), select="params/a")


@pytest.mark.parametrize("bucket_url", BUCKET_KINDS[1:], indirect=True)
def test_a_v2_checkpoint_on_a_bucket_restores_verifies_and_has_no_strays(bucket_url) -> None:
    from stepsafe.checkpoint.restore import open_checkpoint

    url = f"{bucket_url}/1"
    results = jax_processes.run(SAVE, 2, args=lambda i, port: [url], timeout_s=120)
    assert all(r.returncode == 0 for r in results), "\n".join(r.describe() for r in results)
    with open_checkpoint(url) as reader:
        assert reader.manifest.parts is not None  # version 2
        np.testing.assert_array_equal(reader.read_array("params/a"), _want(1))
        assert stray_files(reader.storage, reader.path) == []
    np.testing.assert_array_equal(stepsafe.restore(url, select="params/b"), _want(2))
    assert stepsafe.verify(url).ok
    assert _cli("inspect", url)[0] == 0


def test_gc_never_deletes_a_part_file_the_committed_manifest_lists(saved, tmp_path) -> None:
    step = _copy(saved, tmp_path)
    part = _part(step, 1)
    renamed = part.with_name("part_1.0123456789ab.json")
    part.rename(renamed)
    doc = json.loads(_manifest(step).read_text())
    doc["parts"][1][0] = renamed.name
    _commit(step, doc)
    # a listed part must be that process's part of this save: any other name is damage
    with pytest.raises(ManifestError, match="not that process's part of this save"):
        stepsafe.restore(str(step), select="params/a")
    _cli("gc", str(tmp_path / "run"), "--keep", "1")  # a damaged step: reported, kept
    assert renamed.exists()


TWO_MESHES = """
import sys, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import stepsafe
devices = np.array(jax.devices())
x = np.arange(128, dtype=np.float32).reshape(8, 16)
def on(mesh):
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("data", "model")),
                                        lambda i: x[i], dtype=x.dtype)
# the same sharding record (axis names, mesh shape, spec) on other devices
if sys.argv[2] == "reversed":  # the devices in another order
    a = on(Mesh(devices.reshape(2, 2), ("data", "model")))
    b = on(Mesh(devices[::-1].reshape(2, 2), ("data", "model")))
else:  # pipeline stages: one on process 0's devices, one on process 1's
    a = on(Mesh(devices[:2].reshape(1, 2), ("data", "model")))
    b = on(Mesh(devices[2:].reshape(1, 2), ("data", "model")))
stepsafe.save(sys.argv[1], {"a": a, "b": b})
back = stepsafe.restore(sys.argv[1])
assert np.array_equal(back["a"], x) and np.array_equal(back["b"], x)
print("ok", flush=True)
"""


@pytest.mark.parametrize("devices", ["reversed", "stages"])
def test_two_arrays_on_meshes_of_one_shape_but_other_devices_save(devices, tmp_path) -> None:
    path = tmp_path / "1"
    results = jax_processes.run(
        TWO_MESHES, 2, args=lambda i, port: [str(path), devices], timeout_s=120
    )
    assert all(r.returncode == 0 for r in results), "\n".join(r.describe() for r in results)
