"""Hugging Face safetensors files, written one tensor at a time and read lazily: what stepsafe
writes, the safetensors library reads bit for bit (dtypes, shapes, sharding and index as Hugging
Face lays them out), and what the library writes, stepsafe reads. Real files; no mocks."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.convert.safetensors_files import INDEX, SINGLE, read_safetensors, write_safetensors
from stepsafe.errors import CheckpointExistsError, CheckpointNotFoundError, ConfigError

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "model.embed_tokens.weight": rng.standard_normal((100, 30)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((40, 40)).astype(
            ml_dtypes.bfloat16
        ),
        "model.layers.0.input_layernorm.weight": np.ones(30, np.float16),
        "positions": np.arange(7, dtype=np.int64),
        "flags": np.array([True, False]),
        "scalar": np.array(3.5, np.float64),
        "empty": np.zeros((0, 3), np.float32),
        "bytes": np.arange(5, dtype=np.uint8),
    }


def leaves(arrays: dict[str, np.ndarray]) -> list[tuple[str, OutLeaf]]:
    return [(k, OutLeaf(v.shape, v.dtype, lambda v=v: v)) for k, v in arrays.items()]


def load_all(directory) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(safetensors_numpy.load_file(str(f)))
    return out


def test_one_file_is_read_bit_for_bit_by_the_safetensors_library(tmp_path):
    arrays = tensors()
    assert write_safetensors(str(tmp_path / "m"), leaves(arrays)) == [SINGLE]
    got = load_all(tmp_path / "m")
    assert set(got) == set(arrays)
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / SINGLE), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers expects


def test_split_at_a_size_limit_as_hugging_face_does_with_an_index(tmp_path):
    arrays = tensors()
    limit = 4000  # the embedding (12000 bytes) goes alone; the rest fill files in order
    files = write_safetensors(str(tmp_path / "m"), leaves(arrays), max_shard_bytes=limit)
    shards = [f for f in files if f != INDEX]
    assert shards[0] == "model-00001-of-00002.safetensors" and INDEX in files
    index = json.loads((tmp_path / "m" / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in arrays.values())
    assert index["weight_map"]["model.embed_tokens.weight"] == shards[0]
    assert set(index["weight_map"]) == set(arrays)
    sizes = {}
    for name, file in index["weight_map"].items():
        sizes[file] = sizes.get(file, 0) + arrays[name].nbytes
    assert all(n <= limit for f, n in sizes.items() if f != shards[0])
    got = load_all(tmp_path / "m")
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)


def test_files_the_library_wrote_are_read_lazily_with_their_dtypes(tmp_path):
    arrays = tensors()
    (tmp_path / "hf").mkdir()
    safetensors_numpy.save_file(arrays, str(tmp_path / "hf" / SINGLE), metadata={"format": "pt"})
    back = dict(read_safetensors(str(tmp_path / "hf")))  # headers only, so far
    assert set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].shape == v.shape and np.dtype(back[k].dtype) == v.dtype, k
        np.testing.assert_array_equal(back[k].make(), v)
    # and a round trip through stepsafe's writer
    write_safetensors(str(tmp_path / "again"), list(back.items()), max_shard_bytes=100)
    again = dict(read_safetensors(str(tmp_path / "again")))
    for k, v in arrays.items():
        np.testing.assert_array_equal(again[k].make(), v)


def test_refusals_write_nothing(tmp_path):
    arrays = tensors()
    with pytest.raises(ConfigError, match="given twice"):
        write_safetensors(str(tmp_path / "a"), leaves(arrays) * 2)
    with pytest.raises(ConfigError, match="cannot hold"):
        write_safetensors(str(tmp_path / "b"), leaves({"s": np.array(["x"])}))
    write_safetensors(str(tmp_path / "c"), leaves(arrays))
    with pytest.raises(CheckpointExistsError):
        write_safetensors(str(tmp_path / "c"), leaves(arrays))
    with pytest.raises(CheckpointNotFoundError, match="not a Hugging Face model"):
        read_safetensors(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_a_tensor_that_fails_to_come_leaves_no_directory(tmp_path):
    def broken() -> np.ndarray:
        raise RuntimeError("the source went away")

    items = [*leaves(tensors()), ("late", OutLeaf((2,), np.dtype(np.float32), broken))]
    with pytest.raises(RuntimeError, match="went away"):
        write_safetensors(str(tmp_path / "m"), items, max_shard_bytes=1000)
    assert list(tmp_path.iterdir()) == []
