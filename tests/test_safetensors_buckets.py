"""Hugging Face safetensors in buckets (#15 item 7: conversions work from and to buckets), on
the loopback S3 and GCS servers and the in-memory store: files the safetensors library wrote,
uploaded as they are, read back by stepsafe's own header reader (the library reads local files
only) bit for bit, by region too; a model written to a bucket appears whole (index or single
file last, created exclusively) or not at all, and never overwrites one."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from conftest import BUCKET_KINDS

from stepsafe import knobs
from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.convert.safetensors_files import INDEX, SINGLE, read_safetensors, write_safetensors
from stepsafe.errors import CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError
from stepsafe.storage import storage_for

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "model.embed_tokens.weight": rng.standard_normal((64, 24)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((3, 40, 8)).astype(
            ml_dtypes.bfloat16
        ),
        "model.norm.weight": np.ones(24, np.float16),
        "positions": np.arange(7, dtype=np.int64),
        "scalar": np.array(2.5, np.float64),
        "empty": np.zeros((0, 3), np.float32),
    }


def upload(url: str, name: str, data: bytes) -> None:
    storage, path = storage_for(url)
    storage.put_whole(storage.join(path, name), data)


def listing(url: str) -> list[str]:
    storage, path = storage_for(url)
    return sorted(storage.list_dir(path)) if storage.exists(path) else []


@pytest.mark.parametrize("bucket_url", BUCKET_KINDS, indirect=True)
def test_the_librarys_files_are_read_from_a_bucket(bucket_url, tmp_path, monkeypatch):
    arrays = tensors()
    safetensors_numpy.save_file(arrays, str(tmp_path / SINGLE))
    upload(bucket_url, SINGLE, (tmp_path / SINGLE).read_bytes())
    read = dict(read_safetensors(bucket_url))
    assert read.keys() == arrays.keys()
    for name, a in arrays.items():
        got = np.asarray(read[name].make())
        assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a), name
    monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", 200)  # region reads
    kernel = read["model.layers.0.mlp.up_proj.weight"]
    box = ((1, 3), (5, 17), (2, 8))
    assert np.array_equal(
        kernel.box(box), arrays["model.layers.0.mlp.up_proj.weight"][1:3, 5:17, 2:8]
    )
    blocks = np.concatenate([b.reshape(-1) for b in kernel.blocks()])
    assert np.array_equal(blocks, arrays["model.layers.0.mlp.up_proj.weight"].reshape(-1))


@pytest.mark.parametrize("bucket_url", BUCKET_KINDS, indirect=True)
def test_a_sharded_model_goes_to_a_bucket_and_back(bucket_url):
    arrays = tensors()
    leaves = [(k, OutLeaf(v.shape, v.dtype, lambda v=v: v)) for k, v in arrays.items()]
    files = write_safetensors(bucket_url, leaves, max_shard_bytes=2000)
    assert files[-1] == INDEX and len(files) > 2
    assert listing(bucket_url) == sorted(files)
    storage, path = storage_for(bucket_url)
    index = json.loads(storage.read_bytes(storage.join(path, INDEX)))
    assert set(index["weight_map"]) == set(arrays)
    for name, leaf in read_safetensors(bucket_url):
        assert np.array_equal(np.asarray(leaf.make()), arrays[name]), name
    with pytest.raises(CheckpointExistsError):  # never overwritten
        write_safetensors(bucket_url, leaves[:1])
    assert listing(bucket_url) == sorted(files)


@pytest.mark.parametrize("bucket_url", ["memory", "s3"], indirect=True)
def test_a_failed_upload_leaves_nothing(bucket_url):
    def broken() -> np.ndarray:
        raise RuntimeError("the source went away")

    arrays = tensors()
    leaves = [(k, OutLeaf(v.shape, v.dtype, lambda v=v: v)) for k, v in arrays.items()]
    leaves.append(("late", OutLeaf((2,), np.dtype(np.float32), broken)))
    with pytest.raises(RuntimeError, match="went away"):
        write_safetensors(bucket_url, leaves, max_shard_bytes=2000)
    assert listing(bucket_url) == []
    with pytest.raises(CheckpointNotFoundError, match="not a Hugging Face model"):
        read_safetensors(bucket_url)


def _file(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "header, data, why",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "end at"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "bytes 0..8"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "bytes 4..8"),
        ({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "Q9"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "data_offsets"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            b"\0" * 4,
            "bytes 0..4",
        ),
    ],
)
def test_a_damaged_header_in_a_bucket_is_refused(bucket_url, header, data, why):
    upload(bucket_url, SINGLE, _file(header, data))
    with pytest.raises(CorruptCheckpointError, match=why):
        read_safetensors(bucket_url)


def test_a_header_longer_than_its_file_is_refused(bucket_url):
    upload(bucket_url, SINGLE, struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CorruptCheckpointError, match="header of"):
        read_safetensors(bucket_url)


@pytest.mark.parametrize("bucket_url", ["memory", "gcs"], indirect=True)
def test_config_json_goes_with_the_weights(bucket_url, tmp_path):
    from stepsafe.convert.hf import read_config

    arrays = tensors()
    leaves = [(k, OutLeaf(v.shape, v.dtype, lambda v=v: v)) for k, v in arrays.items()]
    config = {"model_type": "llama", "num_attention_heads": 4}
    for where in (bucket_url, str(tmp_path / "m")):
        files = write_safetensors(
            where, leaves, extra_files={"config.json": json.dumps(config).encode()}
        )
        assert sorted(files) == sorted([SINGLE, "config.json"])
        assert read_config(where) == config
        assert read_config(f"{where}/config.json", required=True) == config
    with pytest.raises(Exception, match="cannot be written beside"):
        write_safetensors(str(tmp_path / "n"), leaves, extra_files={SINGLE: b"x"})
