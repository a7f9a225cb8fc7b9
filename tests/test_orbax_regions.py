"""Orbax arrays read through tensorstore as orbax-checkpoint opens them (#15 item 5: Orbax import
in bounded memory): whole or by region, bit for bit as numpy slicing, on checkpoints
orbax-checkpoint itself writes (OCDBT or not, zarr3 or zarr2, several chunks or one, sharded
from a mesh of CPU devices, in a bucket); a conversion reads an array bigger than a block by
regions of whole chunks, at about a block's peak; a store unlike Orbax's metadata is refused;
what tensorstore cannot open is read by Orbax's own restore."""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

ocp = pytest.importorskip("orbax.checkpoint")
import jax  # noqa: E402
from test_convert_blocks import MEASURE as CONVERT_MEASURE  # noqa: E402
from test_orbax_buckets import gcs_url  # noqa: E402, F401  (a fixture)

import stepsafe  # noqa: E402
from stepsafe import knobs  # noqa: E402
from stepsafe.checkpoint.orbax_locate import find_orbax  # noqa: E402
from stepsafe.checkpoint.orbax_read import open_orbax  # noqa: E402
from stepsafe.checkpoint.orbax_regions import OrbaxRegions, footprint, pieces  # noqa: E402
from stepsafe.convert import convert_checkpoint  # noqa: E402
from stepsafe.convert.source import open_source, source_tree  # noqa: E402
from stepsafe.errors import CorruptCheckpointError, TargetMismatchError  # noqa: E402
from stepsafe.format import CheckpointReader  # noqa: E402
from stepsafe.storage import storage_for  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "kernel": rng.standard_normal((24, 6, 40)).astype(BF16),
            "counts": rng.integers(-(2**31), 2**31 - 1, (50, 12), dtype=np.int32),
            "scale": rng.standard_normal((33,)).astype(np.float32),
            "flags": rng.standard_normal((7, 5)) > 0,
        },
        "step": 9,
    }


def write(root: Path | str, tree: dict, *, use_ocdbt: bool = True, use_zarr3: bool = True,
          chunk_bytes: int | None = 256) -> str:  # fmt: skip
    """``tree`` saved as MaxText saves (``CheckpointManager``, one item ``items``), each array
    cut into chunks of at most ``chunk_bytes`` (Orbax's ``SaveArgs.chunk_byte_size``)."""
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=chunk_bytes), tree)
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(
        str(root), item_names=("items",), item_handlers={"items": handler}, options=options
    ) as m:
        m.save(1, args=ocp.args.Composite(items=ocp.args.PyTreeSave(tree, save_args=save_args)))
        m.wait_until_finished()
    return f"{root}/1"


def random_boxes(shape: tuple[int, ...], n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = [tuple((0, s) for s in shape)]
    for _ in range(n):
        box = []
        for s in shape:
            a = int(rng.integers(0, s))
            box.append((a, int(rng.integers(a + 1, s + 1))))
        out.append(tuple(box))
    return out


def sliced(a: np.ndarray, box) -> np.ndarray:
    return a[tuple(slice(x, y) for x, y in box)]


def same(got: np.ndarray, want: np.ndarray) -> bool:
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


# -- region reads --------------------------------------------------------------------------------
@pytest.mark.parametrize("use_ocdbt", [True, False], ids=["ocdbt", "no-ocdbt"])
@pytest.mark.parametrize("use_zarr3", [True, False], ids=["zarr3", "zarr2"])
@pytest.mark.parametrize("chunk_bytes", [256, None], ids=["chunks", "one-chunk"])
def test_regions_are_numpy_slices_bit_for_bit(tmp_path, use_ocdbt, use_zarr3, chunk_bytes):
    tree = state()
    step = write(tmp_path / "ckpts", tree, use_ocdbt=use_ocdbt, use_zarr3=use_zarr3,
                 chunk_bytes=chunk_bytes)  # fmt: skip
    with open_orbax(find_orbax(step)) as ckpt:
        for name, a in tree["params"].items():
            key = f"params/{name}"
            chunk = ckpt.chunk_bytes(key)
            assert chunk is not None and chunk <= (chunk_bytes or a.nbytes)
            assert same(ckpt.read_array(key, budget=64), a)  # by pieces into one array
            for box in random_boxes(a.shape, 12):
                for budget in (1, 300, 1 << 20):
                    assert same(ckpt.read_box(key, box, budget), sliced(a, box)), (key, box)
        assert ckpt.read(["step"]) == {"step": 9}  # a Python scalar: Orbax's restore
    assert_restored(stepsafe.restore(step), tree)


def assert_restored(got: dict, want: dict) -> None:
    assert got["step"] == want["step"]
    for name, a in want["params"].items():
        assert same(np.asarray(got["params"][name]), a), name


def test_an_array_saved_from_a_device_mesh_reads_by_its_shards(tmp_path):
    """MaxText saves sharded jax.Arrays: one chunk per shard, so a region reads only the
    shards it overlaps."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
    host = np.random.default_rng(3).standard_normal((16, 12, 3)).astype(BF16)
    tree = {"params": {"w": jax.device_put(host, sharding)}, "step": 2}
    step = write(tmp_path / "ckpts", tree, chunk_bytes=None)
    with open_orbax(find_orbax(step)) as ckpt:
        assert ckpt.chunk_bytes("params/w") == 8 * 6 * 3 * 2  # a shard
        for box in random_boxes(host.shape, 20, seed=1):
            assert same(ckpt.read_box("params/w", box, budget=100), sliced(host, box))


def test_regions_of_an_orbax_checkpoint_in_a_bucket(gcs_url):  # noqa: F811
    tree = state(1)
    step = write(f"{gcs_url}/ckpts", tree)
    with open_orbax(find_orbax(step)) as ckpt:
        a = tree["params"]["kernel"]
        for box in random_boxes(a.shape, 4):
            assert same(ckpt.read_box("params/kernel", box, budget=512), sliced(a, box))


@pytest.mark.parametrize("shape, chunk", [((10,), (3,)), ((7, 9, 4), (2, 4, 4)),
                                          ((6, 6), (6, 1)), ((5, 8, 3), (5, 8, 3))])  # fmt: skip
@pytest.mark.parametrize("budget", [1, 24, 100, 10_000])
def test_pieces_tile_the_box_within_the_budget_or_one_chunk(shape, chunk, budget):
    grid = np.zeros(shape, np.int32)
    for box in random_boxes(shape, 10, seed=budget):
        grid[:] = 0
        for piece in pieces(box, chunk, 4, budget):
            grid[tuple(slice(a, b) for a, b in piece)] += 1
            one_chunk = all(a // c == (b - 1) // c for (a, b), c in zip(piece, chunk))
            assert footprint(piece, chunk) * 4 <= budget or one_chunk, (box, piece)
        assert (sliced(grid, box) == 1).all() and grid.sum() == np.prod([b - a for a, b in box])


# -- what is refused, and the fallback -----------------------------------------------------------
@pytest.mark.parametrize("change", ["dtype", "shape"])
def test_a_store_unlike_orbaxs_metadata_is_refused_not_cast(tmp_path, change):
    """The array's zarr metadata changed after Orbax's metadata was read: an error naming
    both, never a silent cast or reshape."""
    tree = {"params": {"w": np.arange(24, dtype=np.float32).reshape(4, 6)}, "step": 1}
    step = write(tmp_path / "ckpts", tree, use_ocdbt=False, use_zarr3=False, chunk_bytes=None)
    with open_orbax(find_orbax(step)) as ckpt:
        zarray = Path(step) / "items" / "params.w" / ".zarray"
        meta = json.loads(zarray.read_text())
        if change == "dtype":
            meta["dtype"] = "<i4"
        else:
            meta["shape"], meta["chunks"] = [6, 4], [6, 4]
        zarray.write_text(json.dumps(meta))
        with pytest.raises(CorruptCheckpointError, match="Orbax's metadata says"):
            ckpt.read_array("params/w")
        with pytest.raises(CorruptCheckpointError, match="Orbax's metadata says"):
            ckpt.read_box("params/w", ((0, 2), (0, 3)))


def test_a_region_outside_the_array_is_refused(tmp_path):
    step = write(tmp_path / "ckpts", state())
    with open_orbax(find_orbax(step)) as ckpt:
        for box in [((0, 25), (0, 6), (0, 40)), ((3, 2), (0, 6), (0, 40)), ((0, 24), (0, 6))]:
            with pytest.raises(TargetMismatchError, match="has no region"):
                ckpt.read_box("params/kernel", box)


def test_what_tensorstore_cannot_open_is_read_by_orbaxs_restore(tmp_path, monkeypatch, caplog):
    tree = state(2)
    step = write(tmp_path / "ckpts", tree)
    real = ocp.type_handlers.get_json_tspec_read

    def elsewhere(info, use_ocdbt, **kw):
        spec = real(info, use_ocdbt=use_ocdbt, **kw)
        spec["kvstore"]["path"] = "no-such-array"
        return spec

    monkeypatch.setattr(ocp.type_handlers, "get_json_tspec_read", elsewhere)
    with caplog.at_level(logging.WARNING, logger="stepsafe"), open_orbax(find_orbax(step)) as c:
        a = tree["params"]["kernel"]
        assert same(c.read_array("params/kernel"), a)
        assert same(c.read_box("params/kernel", ((2, 9), (1, 4), (0, 40))), a[2:9, 1:4])
    assert "orbax-checkpoint's restore instead" in caplog.text


# -- conversions ---------------------------------------------------------------------------------
def test_a_conversion_reads_a_big_array_by_regions_of_whole_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", 1024)
    rng = np.random.default_rng(4)
    big = rng.standard_normal((16, 4, 40)).astype(np.float32)  # 10 KiB, chunks of a row at most
    one = rng.standard_normal((30, 20)).astype(BF16)  # 1200 bytes as one chunk: read whole
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    tree = {"params": {"layers": {"w": jax.device_put(big, rows)}, "one": one}, "step": 3}
    step = write(tmp_path / "ckpts", tree, chunk_bytes=512)
    step_one = write(tmp_path / "one", {"params": {"one": one}}, chunk_bytes=None)
    read: dict[str, list] = {"boxes": [], "whole": []}
    box, whole = OrbaxRegions.read_box, OrbaxRegions.read

    def spy_box(self, key, b, budget):
        read["boxes"].append((key, b))
        return box(self, key, b, budget)

    def spy_whole(self, keys, budget):
        keys = list(keys)
        read["whole"] += keys
        return whole(self, keys, budget)

    monkeypatch.setattr(OrbaxRegions, "read_box", spy_box)
    monkeypatch.setattr(OrbaxRegions, "read", spy_whole)
    with open_source(step_one) as src:
        assert source_tree(src)["params"]["one"].box is None  # a block would decode it whole
    dst = tmp_path / "out" / "checkpoints" / "3"
    convert_checkpoint(step, str(dst), param_only=True, unstack=True, scan_axis=1)
    assert "params/layers/w" not in read["whole"] and read["boxes"]
    size = {"params/layers/w": 4, "params/one": 2}
    assert max(np.prod([b - a for a, b in r]) * size[k] for k, r in read["boxes"]) <= 1024
    got = CheckpointReader(*storage_for(str(dst)))
    for i in range(4):
        assert same(got.read_array(f"params/layers_{i}/w"), big[:, i])
    assert same(got.read_array("params/one"), one)


# test_convert_blocks' measurement, with orbax-checkpoint imported and JAX's CPU backend up
# before the peak is reset, as in a MaxText process
MEASURE = "import jax, orbax.checkpoint\njax.devices()\n" + CONVERT_MEASURE


@pytest.fixture(scope="module")
def sharded_256(tmp_path_factory) -> tuple[str, np.ndarray]:
    """A 256 MiB array saved from a mesh of 4 CPU devices along its rows, in chunks of 2 MiB
    (16 rows), as MaxText's sharded saves cut their arrays."""
    big = np.random.default_rng(5).standard_normal((2048, 4, 8192), np.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    tree = {"params": {"layers": {"w": jax.device_put(big, rows)}}, "step": 1}
    return write(tmp_path_factory.mktemp("sharded") / "ckpts", tree, chunk_bytes=2 << 20), big


@pytest.mark.parametrize(
    "options",
    [{"param_only": True}, {"param_only": True, "unstack": True, "scan_axis": 1}],
    ids=["stacked", "unstack-axis-1"],
)
def test_an_orbax_array_bigger_than_a_block_converts_in_bounded_memory(
    tmp_path, sharded_256, options
):
    """Blocks of 8 MiB: the conversion's peak stays far below the 256 MiB array, which
    Orbax's restore holds twice (a fresh process, the kernel's peak RSS: a block, the chunks
    tensorstore decodes for it in parallel (an unstacked layer's block: all 4 layers' rows),
    the writer's pieces, the allocator's per-thread arenas; 70 to 130 MiB here)."""
    step, big = sharded_256
    env = {**os.environ, "STEPSAFE_CONVERT_BLOCK_BYTES": str(8 << 20), "JAX_PLATFORMS": "cpu"}
    dst = tmp_path / "dst"
    p = subprocess.run(
        [sys.executable, "-c", MEASURE, step, str(dst), json.dumps(options)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    rise = json.loads(p.stdout)["rise"]
    print(f"{options}: peak rise {rise / 2**20:.0f} MiB for a 256 MiB array in 8 MiB blocks")
    assert rise < 160 << 20
    got = CheckpointReader(*storage_for(str(dst)))
    if options.get("unstack"):
        assert same(got.read_array("params/layers_2/w"), big[:, 2])
    else:
        assert same(got.read_array("params/layers/w"), big)


def test_boxes_of_every_shape_against_numpy(tmp_path):
    """Every box of a small 3-d array, bf16, through tensorstore's region reads."""
    a = np.random.default_rng(6).standard_normal((3, 4, 5)).astype(BF16)
    step = write(tmp_path / "ckpts", {"params": {"a": a}}, chunk_bytes=16)
    with open_orbax(find_orbax(step)) as ckpt:
        spans = [[(x, y) for x in range(n) for y in range(x + 1, n + 1)] for n in a.shape]
        for box in itertools.islice(itertools.product(*spans), 0, None, 7):
            assert same(ckpt.read_box("params/a", box, budget=20), sliced(a, box))
