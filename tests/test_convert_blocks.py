"""Arrays bigger than CONVERT_BLOCK_BYTES are made block by block (#15 item 7: chunk by chunk
for leaves larger than a limit): contiguous runs of rows, each read as a region of the source,
one held at a time. The blocks must cover the array exactly, in C order, each within the limit,
and the bytes written must be the array's, whatever the writer's ranges."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

from stepsafe import knobs
from stepsafe.convert.lazy_leaf import LazyLeaf, OutLeaf, block_boxes
from stepsafe.convert.stacking import stack_layers, unstack_layers
from stepsafe.convert.write_tree import write_tree
from stepsafe.format import CheckpointReader
from stepsafe.storage import storage_for

SHAPES = [(10,), (7, 5, 3), (1, 100), (3, 1, 9), (4, 6, 2, 5), (2, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("limit", [4, 12, 40, 100, 10_000])
def test_blocks_cover_the_array_in_c_order_within_the_limit(shape, limit):
    a = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    boxes = block_boxes(shape, 4, limit)
    parts = [a[tuple(slice(x, y) for x, y in box)] for box in boxes]
    assert np.array_equal(np.concatenate([p.ravel() for p in parts]), a.ravel())
    assert all(p.nbytes <= max(limit, 4) for p in parts)


class Source:
    """An array read by region, recording the regions asked for and whether it was read
    whole (a conversion of a big array must never do that)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a, self.regions, self.whole = a, [], 0

    def make(self) -> np.ndarray:
        self.whole += 1
        return self.a.copy()

    def box(self, box) -> np.ndarray:
        self.regions.append(box)
        return self.a[tuple(slice(x, y) for x, y in box)].copy()

    def leaf(self) -> OutLeaf:
        return OutLeaf(self.a.shape, self.a.dtype, self.make, box=self.box)


def _bytes(leaf: OutLeaf, ranges) -> bytes:
    lazy = LazyLeaf("k", leaf)
    out, at = [], 0
    for n in ranges:
        stop = min(at + n, lazy.nbytes)
        out.append(bytes(lazy.bytes_at(at, stop)))
        at = stop
        if at == lazy.nbytes:
            break
    return b"".join(out)


@pytest.mark.parametrize("step", [1, 7, 64, 1000, 5000])
def test_a_big_leaf_is_served_block_by_block_for_any_range(monkeypatch, step):
    monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", 256)
    src = Source(np.random.default_rng(0).standard_normal((9, 7, 11)).astype(np.float32))
    got = _bytes(src.leaf(), itertools.repeat(step))
    assert got == src.a.tobytes()
    assert src.whole == 0
    assert max(np.prod([y - x for x, y in b]) * 4 for b in src.regions) <= 256


def test_a_small_leaf_is_made_whole(monkeypatch):
    monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", 1 << 20)
    src = Source(np.arange(100, dtype=np.float32))
    assert _bytes(src.leaf(), [133, 133, 134]) == src.a.tobytes()
    assert (src.whole, src.regions) == (1, [])


def test_ranges_asked_again_are_served_again(monkeypatch):
    monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", 64)
    src = Source(np.arange(200, dtype=np.int32))
    lazy = LazyLeaf("k", src.leaf())
    first = bytes(lazy.bytes_at(0, 300))
    assert bytes(lazy.bytes_at(0, 300)) == first == src.a.tobytes()[:300]  # a retried write
    assert bytes(lazy.bytes_at(300, 800)) == src.a.tobytes()[300:]


def test_a_block_of_the_wrong_shape_is_refused(monkeypatch):
    monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", 64)
    a = np.arange(200, dtype=np.int32)
    leaf = OutLeaf(a.shape, a.dtype, lambda: a, box=lambda b: a[:3])
    with pytest.raises(Exception, match="was planned"):
        _bytes(leaf, [800])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_unstack_and_stack_of_big_arrays_read_regions_only(tmp_path, monkeypatch, axis):
    monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", 256)
    rng = np.random.default_rng(1)
    shape = [8, 8, 8]
    shape[axis] = 4  # the layers
    kernel = Source(rng.standard_normal(shape).astype(ml_dtypes.bfloat16))
    scale = Source(rng.standard_normal((4, 3) if axis == 0 else (3, 4)).astype(np.float32))
    tree = {"layers": {"kernel": kernel.leaf(), "scale": scale.leaf()}}
    flat, found = unstack_layers(tree, axis=axis, key="layers")
    assert found == 1
    storage, path = storage_for(str(tmp_path / "unstacked"))
    write_tree(storage, path, {"params": flat}, step=0)
    assert kernel.whole == 0  # 512 bytes > 256: read by regions, never whole
    assert max(np.prod([y - x for x, y in b]) * 2 for b in kernel.regions) <= 256
    back = CheckpointReader(storage, path)
    for i in range(4):
        want = np.take(kernel.a, i, axis=axis)
        assert np.array_equal(back.read_array(f"params/layers_{i}/kernel"), want)

    parts = {
        f"layers_{i}": {"kernel": Source(np.take(kernel.a, i, axis=axis)).leaf()} for i in range(4)
    }
    stacked, found = stack_layers(parts, axis=axis, key="layers")
    assert found == 1
    storage, path = storage_for(str(tmp_path / "stacked"))
    write_tree(storage, path, {"params": stacked}, step=0)
    got = CheckpointReader(storage, path).read_array("params/layers/kernel")
    assert got.dtype == kernel.a.dtype and np.array_equal(got, kernel.a)


def test_safetensors_tensors_are_read_and_written_by_regions(tmp_path, monkeypatch):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from stepsafe.convert.safetensors_files import read_safetensors, write_safetensors

    monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", 1000)
    rng = np.random.default_rng(2)
    tensors = {
        "big.f32": rng.standard_normal((50, 30)).astype(np.float32),
        "big.bf16": rng.standard_normal((3, 40, 25)).astype(ml_dtypes.bfloat16),
        "wide": rng.standard_normal((1, 700)).astype(np.float32),
        "small": np.arange(5, dtype=np.int64),
    }
    (tmp_path / "in").mkdir()
    safetensors_numpy.save_file(tensors, str(tmp_path / "in" / "model.safetensors"))
    read = read_safetensors(str(tmp_path / "in"))
    leaves = dict(read)
    assert all(leaves[n].box is not None for n in tensors)
    write_safetensors(str(tmp_path / "out"), read, max_shard_bytes=7000)
    back = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        back.update(safetensors_numpy.load_file(str(f)))
    assert back.keys() == tensors.keys()
    for name, a in tensors.items():
        assert back[name].dtype == a.dtype and np.array_equal(back[name], a), name


def test_conversion_ops_pass_regions_through(monkeypatch):
    from stepsafe.convert import ops

    monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", 128)
    rng = np.random.default_rng(4)
    a = rng.standard_normal((6, 5, 4)).astype(np.float32)
    parts = [Source(rng.standard_normal((5, 4)).astype(np.float32)) for _ in range(3)]
    src = Source(a)
    perm = [2, 0, 3, 1]
    cases = [
        (ops.transpose(src.leaf(), (2, 0, 1)), np.transpose(a, (2, 0, 1))),
        (ops.transpose(src.leaf()), a.T),
        (ops.astype(src.leaf(), ml_dtypes.bfloat16), a.astype(ml_dtypes.bfloat16)),
        (ops.scale(src.leaf(), 0.25), (a * np.float32(0.25)).astype(np.float32)),
        (ops.take(src.leaf(), perm, axis=-1), np.take(a, perm, axis=-1)),
        (ops.stack([p.leaf() for p in parts], axis=1), np.stack([p.a for p in parts], axis=1)),
    ]
    for leaf, want in cases:
        assert leaf.box is not None
        got = np.frombuffer(_bytes(leaf, itertools.repeat(100)), want.dtype).reshape(want.shape)
        assert np.array_equal(got, want)
    assert src.whole == 0 and all(p.whole == 0 for p in parts)


MEASURE = """
import json, sys
import numpy as np
from stepsafe.convert import convert_checkpoint

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts from the current RSS
before = status("VmRSS")
convert_checkpoint(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))
print(json.dumps({"rise": status("VmHWM") - before}))
"""


@pytest.mark.parametrize(
    "options",
    [
        {"param_only": True, "dtype": "bfloat16"},
        {"param_only": True, "unstack": True, "scan_axis": 1},
    ],
    ids=["cast", "unstack-axis-1"],
)
def test_an_array_bigger_than_a_block_converts_in_about_a_blocks_memory(tmp_path, options):
    """A 256 MiB array, blocks of 8 MiB: the conversion's peak stays far below the array
    (measured in a fresh process, the kernel's peak RSS; a few blocks' worth: the block read,
    cast or cut, and the writer's pieces; about 50 MiB here)."""
    import json
    import os
    import subprocess
    import sys

    import stepsafe

    big = np.random.default_rng(5).standard_normal((2048, 4, 8192), np.float32)  # 256 MiB
    src = tmp_path / "src" / "checkpoints" / "1"
    stepsafe.save(str(src), {"params": {"layers": {"w": big}}, "step": 1})
    del big
    env = {**os.environ, "STEPSAFE_CONVERT_BLOCK_BYTES": str(8 << 20), "JAX_PLATFORMS": "cpu"}
    dst = tmp_path / "dst"
    p = subprocess.run(
        [sys.executable, "-c", MEASURE, str(src), str(dst), json.dumps(options)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    rise = json.loads(p.stdout)["rise"]
    print(f"{options}: peak rise {rise / 2**20:.0f} MiB for a 256 MiB array in 8 MiB blocks")
    assert rise < 96 << 20
    got = CheckpointReader(*storage_for(str(dst)))
    want = stepsafe.restore(str(src), select="params")["layers"]["w"]
    if options.get("unstack"):
        assert np.array_equal(got.read_array("params/layers_2/w"), want[:, 2])
    else:
        assert np.array_equal(got.read_array("params/layers/w"), want.astype(ml_dtypes.bfloat16))
