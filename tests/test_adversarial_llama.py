"""Adversarial checks of the Hugging Face conversions (#15 items 3, 4, 7): lazy ops fed arrays
of the wrong shape or dtype, bucket headers the safetensors library refuses, region reads of
bucket files that must stay within the block limit, two exports racing into one bucket
prefix, Llama configs that lie, and float16 models. Inputs are written by the real
safetensors and transformers libraries; buckets are the loopback servers and memory."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from conftest import BUCKET_KINDS

os.environ["HF_HUB_OFFLINE"] = "1"  # never the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from stepsafe import knobs
from stepsafe.convert import ops
from stepsafe.convert.lazy_leaf import LazyLeaf, OutLeaf
from stepsafe.convert.safetensors_files import INDEX, SINGLE, read_safetensors, write_safetensors
from stepsafe.errors import (
    CheckpointExistsError,
    ConfigError,
    CorruptCheckpointError,
    ManifestError,
    StepsafeError,
)
from stepsafe.storage import storage_for

safetensors_numpy = pytest.importorskip("safetensors.numpy")

F32 = np.dtype(np.float32)


def _made(leaf: OutLeaf, limit: int | None = None) -> np.ndarray:
    return np.concatenate([b.reshape(-1) for b in leaf.blocks(limit)]).reshape(leaf.shape)


# --- lazy ops: a source that makes another shape or dtype than it said -----------------------


def _liar(shape, made_shape, made_dtype=np.float32, *, box=False):
    """An OutLeaf planned as ``shape`` float32 that makes ``made_shape`` ``made_dtype``."""
    made = np.arange(np.prod(made_shape), dtype=np.float64).reshape(made_shape).astype(made_dtype)

    def region(b):
        return made[tuple(slice(0, min(y - x, n)) for (x, y), n in zip(b, made.shape))]

    return OutLeaf(shape, F32, lambda: made, box=region if box else None)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: ops.stack([_liar((4, 3), (1, 3))] * 2), id="stack-broadcasts-a-row"),
        pytest.param(lambda: ops.stack([_liar((4, 3), ())] * 2, axis=1), id="stack-scalar"),
        pytest.param(lambda: ops.stack([_liar((4, 3), (4, 3), np.float64)]), id="stack-dtype"),
        pytest.param(lambda: ops.reshape(_liar((4, 6), (6, 4)), (24,)), id="reshape-transposed"),
        pytest.param(lambda: ops.scale(_liar((4, 4), (4, 4), np.float64), 2.0), id="scale-dtype"),
        pytest.param(lambda: ops.astype(_liar((4, 4), (2, 8)), np.float16), id="astype-shape"),
        pytest.param(lambda: ops.take(_liar((4, 4), (1, 4)), [1, 0, 2, 3], 0), id="take-shape"),
    ],
)
def test_a_source_making_another_shape_or_dtype_is_refused_not_broadcast(make):
    leaf = make()
    with pytest.raises(ManifestError, match="planned"):
        _made(leaf)


def test_a_region_of_another_shape_is_refused_when_stacked(monkeypatch):
    parts = [_liar((8, 4), (8, 4), box=True), _liar((8, 4), (1, 4), box=True)]
    # the second's regions come out one row high: stacked, they would broadcast
    with pytest.raises(ManifestError, match="planned"):
        _made(ops.stack(parts, axis=1), limit=64)
    monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", 64)
    lazy = LazyLeaf("k", ops.stack(parts, axis=1))
    with pytest.raises(ManifestError, match="planned"):
        lazy.bytes_at(0, lazy.nbytes)


# --- bucket headers: refused where the safetensors library refuses them -----------------------


def _file(raw: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw + data


def _upload(url: str, name: str, data: bytes) -> None:
    storage, path = storage_for(url)
    storage.put_whole(storage.join(path, name), data)


def _library_refuses(tmp_path, raw: bytes, data: bytes) -> bool:
    from safetensors import safe_open

    path = tmp_path / "lib.safetensors"
    path.write_bytes(_file(raw, data))
    try:
        with safe_open(str(path), framework="numpy") as f:
            list(f.keys())
    except Exception:
        return True
    return False


T = '"a":{"dtype":"F32","shape":%s,"data_offsets":%s}'
HOSTILE = {
    "float-dim": "{" + T % ("[2.0]", "[0,8]") + "}",
    "fractional-dim": "{" + T % ("[2.7]", "[0,8]") + "}",
    "bool-dim": "{" + T % ("[true,2]", "[0,8]") + "}",
    "string-dim": "{" + T % ('["2"]', "[0,8]") + "}",
    "float-offset": "{" + T % ("[2]", "[0,8.5]") + "}",
    "offsets-not-two": "{" + T % ("[2]", "[0,4,8]") + "}",
    "metadata-list": '{"__metadata__":[1],' + T % ("[2]", "[0,8]") + "}",
    "metadata-int-value": '{"__metadata__":{"format":1},' + T % ("[2]", "[0,8]") + "}",
    "nan": '{"__metadata__":{"x":NaN},' + T % ("[2]", "[0,8]") + "}",
    "dim-past-numpy": '{"z":{"dtype":"F32","shape":[18446744073709551616,0],'
    '"data_offsets":[0,0]},' + T % ("[2]", "[0,8]") + "}",
    "entry-not-object": '{"a":[1,2]}',
    "header-not-object": "[1,2]",
}


@pytest.mark.parametrize("bucket_url", ["memory"], indirect=True)
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_header_the_library_refuses_is_refused_in_a_bucket(bucket_url, tmp_path, case):
    raw, data = HOSTILE[case].encode(), b"\0" * 8
    assert _library_refuses(tmp_path, raw, data), "the library reads it: not a hostile case"
    _upload(bucket_url, SINGLE, _file(raw, data))
    with pytest.raises(CorruptCheckpointError, match="not a readable safetensors file"):
        read_safetensors(bucket_url)


@pytest.mark.parametrize("bucket_url", ["memory"], indirect=True)
def test_a_header_the_library_reads_is_read_in_a_bucket_alike(bucket_url, tmp_path):
    """Duplicate names (the last wins, as in the library), extra fields, padding, no
    metadata: read as the library reads them."""
    raw = (
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"a":{"dtype":"I32","shape":[2],"data_offsets":[0,8],"extra":1}}   '
    )
    data = np.array([7, -3], np.int32).tobytes()
    assert not _library_refuses(tmp_path, raw, data)
    local = dict(safetensors_numpy.load_file(str(tmp_path / "lib.safetensors")))
    _upload(bucket_url, SINGLE, _file(raw, data))
    got = {name: np.asarray(leaf.make()) for name, leaf in read_safetensors(bucket_url)}
    assert got.keys() == local.keys()
    assert got["a"].dtype == local["a"].dtype and np.array_equal(got["a"], local["a"])


# --- region reads of a bucket file stay within the block limit -------------------------------


@pytest.mark.parametrize("bucket_url", BUCKET_KINDS, indirect=True)
def test_bucket_regions_read_no_more_than_a_block_at_a_time(bucket_url, tmp_path, monkeypatch):
    """A (1, 1, N) tensor (one row holds it all) and a transposed one (a block is a column
    band: every row crosses it) made block by block: no single read may hold the whole
    tensor, and the bytes are the tensor's."""
    arrays = {
        "row": np.arange(4096, dtype=np.float32).reshape(1, 1, 4096),
        "matrix": np.arange(64 * 64, dtype=np.float32).reshape(64, 64),
        "scalar": np.array(3.5, np.float64),
        "empty": np.zeros((3, 0, 2), np.float32),
    }
    safetensors_numpy.save_file(arrays, str(tmp_path / SINGLE))
    _upload(bucket_url, SINGLE, (tmp_path / SINGLE).read_bytes())
    storage, _ = storage_for(bucket_url)
    reads: list[int] = []
    original = type(storage).read_ranges

    def spy(self, ranges, *args, **kwargs):  # one call: what a read holds at once
        reads.append(sum(memoryview(r.buf).nbytes for r in ranges))
        return original(self, ranges, *args, **kwargs)

    read = dict(read_safetensors(bucket_url))
    monkeypatch.setattr(type(storage), "read_ranges", spy)
    monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", 1024)
    made = {
        "row": _made(read["row"]),
        "matrix.T": _made(ops.transpose(read["matrix"])),
        "scalar": _made(read["scalar"]),
        "empty": _made(read["empty"]),
    }
    assert np.array_equal(made["row"], arrays["row"])
    assert np.array_equal(made["matrix.T"], arrays["matrix"].T)
    assert made["scalar"] == arrays["scalar"] and made["empty"].shape == (3, 0, 2)
    assert max(reads) <= 1024, f"a read of {max(reads)} bytes, the limit 1024"


# --- two exports racing into one bucket prefix ---------------------------------------------


@pytest.mark.parametrize("bucket_url", ["memory", "s3", "gcs"], indirect=True)
def test_a_racing_export_never_deletes_or_overwrites_the_others_files(bucket_url, monkeypatch):
    """Export A is uploading its shards when export B, to the same new prefix, starts and
    runs to its end. Whichever loses must be refused without touching the winner's files:
    the model left is one writer's, whole and bit for bit."""
    storage, path = storage_for(bucket_url)

    def model(value: float) -> list[tuple[str, OutLeaf]]:
        return [
            (f"w{i}", OutLeaf((64,), F32, lambda: np.full(64, value, np.float32))) for i in range(4)
        ]

    original = type(storage).upload
    fired: list[BaseException | None] = []

    def upload(self, target, chunks):
        if not fired:  # A's first shard: B runs whole now
            fired.append(None)
            try:
                write_safetensors(bucket_url, model(2.0), max_shard_bytes=256)
            except BaseException as e:
                fired[0] = e
        return original(self, target, chunks)

    monkeypatch.setattr(type(storage), "upload", upload)
    try:
        write_safetensors(bucket_url, model(1.0), max_shard_bytes=256)
        a_error = None
    except StepsafeError as e:
        a_error = e
    monkeypatch.setattr(type(storage), "upload", original)
    b_error = fired[0]
    assert (a_error is None) != (b_error is None), (a_error, b_error)
    loser = a_error or b_error
    assert isinstance(loser, CheckpointExistsError), loser
    want = 1.0 if a_error is None else 2.0
    got = dict(read_safetensors(bucket_url))
    assert sorted(got) == [f"w{i}" for i in range(4)]
    for name, leaf in got.items():
        assert np.array_equal(np.asarray(leaf.make()), np.full(64, want, np.float32)), name
    names = storage.list_dir(path)
    assert INDEX in names and not [n for n in names if n.startswith(".")], names


@pytest.mark.parametrize("bucket_url", ["memory"], indirect=True)
def test_an_export_interrupted_in_a_bucket_leaves_no_model_and_is_refused_again(bucket_url):
    def broken() -> np.ndarray:
        raise KeyboardInterrupt  # as a Ctrl-C between two tensors

    leaves = [(f"w{i}", OutLeaf((64,), F32, lambda: np.ones(64, np.float32))) for i in range(3)]
    leaves.append(("late", OutLeaf((64,), F32, broken)))
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(bucket_url, leaves, max_shard_bytes=256)
    storage, path = storage_for(bucket_url)
    assert not storage.exists(path) or storage.list_dir(path) == []
    files = write_safetensors(bucket_url, leaves[:3], max_shard_bytes=256)  # nothing blocks it
    assert files[-1] == INDEX


# --- Llama configs that lie, and float16 -----------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _llama(directory, *, heads=4, kv_heads=2, head_dim=16, dtype=None, **extra):
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=128, **extra,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    rng = np.random.default_rng(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = rng.standard_normal(tuple(p.shape)).astype(np.float32) * 0.02
            p.copy_(torch.from_numpy(w + (1.0 if name.endswith("norm.weight") else 0.0)))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(directory))
    return model


def _round_trip(tmp_path, model_dir):
    from stepsafe.convert.hf import export_safetensors, import_safetensors, read_config
    from stepsafe.convert.hf_llama import from_hf, to_hf

    import_safetensors(str(model_dir), str(tmp_path / "mt"), from_hf)
    export_safetensors(
        str(tmp_path / "mt"), str(tmp_path / "out"), to_hf, config=read_config(str(model_dir))
    )
    return safetensors_numpy.load_file(str(tmp_path / "out" / SINGLE))


def test_key_value_heads_that_do_not_divide_the_heads_are_refused(tmp_path):
    """transformers saves such a model (its repeat_kv fails only in a forward pass); its
    import must say so, not make a tree no attention can use."""
    from stepsafe.convert.hf import import_safetensors
    from stepsafe.convert.hf_llama import from_hf, to_hf

    _llama(tmp_path / "hf", heads=4, kv_heads=3)
    with pytest.raises(ConfigError, match="key/value heads"):
        import_safetensors(str(tmp_path / "hf"), str(tmp_path / "mt"), from_hf)
    assert not (tmp_path / "mt").exists()
    tree = {  # and an exported tree with such heads: a config transformers cannot run
        "token_embedder": {"embedding": np.zeros((8, 4), np.float32)},
        "decoder": {
            "decoder_norm": {"scale": np.ones(4, np.float32)},
            "layers_0": {
                "self_attention": {
                    "query": {"kernel": np.zeros((4, 4, 2), np.float32)},
                    "key": {"kernel": np.zeros((4, 3, 2), np.float32)},
                    "value": {"kernel": np.zeros((4, 3, 2), np.float32)},
                    "out": {"kernel": np.zeros((4, 2, 4), np.float32)},
                },
                "mlp": {k: {"kernel": np.zeros((4, 4), np.float32)} for k in ("wi_0", "wi_1")}
                | {"wo": {"kernel": np.zeros((4, 4), np.float32)}},
                "pre_self_attention_layer_norm": {"scale": np.ones(4, np.float32)},
                "post_self_attention_layer_norm": {"scale": np.ones(4, np.float32)},
            },
        },
    }
    with pytest.raises(ConfigError, match="key/value heads"):
        to_hf(tree, {})


def test_a_head_dim_other_than_hidden_over_heads_round_trips(tmp_path):
    """head_dim given explicitly (heads x head_dim != hidden_size, as in Qwen3 or Gemma):
    within one rounding of the query scale (sqrt(32) is no power of two), the rest exact."""
    model = _llama(tmp_path / "hf", head_dim=32)
    got = _round_trip(tmp_path, tmp_path / "hf")
    for name, want in model.state_dict().items():
        w = want.numpy()
        if "q_proj" in name:
            np.testing.assert_allclose(got[name], w, rtol=1e-6, atol=0)
        else:
            assert np.array_equal(got[name], w), name


def test_float16_query_kernels_lose_only_their_subnormal_bits(tmp_path):
    """head_dim 64 (scale 1/8): bfloat16 and float32 round trip bit for bit, float16 not:
    a query weight below 8 x float16's smallest normal becomes subnormal when scaled and
    loses bits, as in MaxText's own conversion. Every other weight is exact, and what a
    query weight loses is within float16's subnormal spacing x 8."""
    model = _llama(tmp_path / "hf", head_dim=64, dtype=torch.float16)
    got = _round_trip(tmp_path, tmp_path / "hf")
    tiny = np.finfo(np.float16).tiny
    for name, want in model.state_dict().items():
        w = want.numpy()
        assert got[name].dtype == np.float16, name
        if "q_proj" not in name:
            assert np.array_equal(got[name], w), name
            continue
        differ = got[name] != w
        assert differ.any()  # the documented loss happens
        assert (np.abs(w[differ]) < 8 * tiny).all()
        spacing = np.float32(2.0**-24) * 8
        assert (np.abs(got[name].astype(np.float32) - w.astype(np.float32)) <= spacing).all()


# --- reshape passes regions through: Llama's attention kernels are made block by block ------


@pytest.mark.parametrize("seed", range(40))
def test_a_reshaped_region_is_numpys(seed, monkeypatch):
    """Random shapes, reshapes (splits, merges, both) and regions, including empty ones and
    ones that are no contiguous run (columns): the region of the reshaped leaf is numpy's,
    and no region read of the source is bigger than the block limit or twice the region."""
    rng = np.random.default_rng(seed)
    old = tuple(int(n) for n in rng.integers(1, 6, size=rng.integers(1, 5)))
    a = np.arange(int(np.prod(old)), dtype=np.int16).reshape(old)
    flat = a.reshape(-1).shape[0]
    parts = [n for n in range(1, flat + 1) if flat % n == 0]
    first = int(rng.choice(parts))
    rest = flat // first
    new = (first, rest) if seed % 3 else (first, *[n for n in (rest,) if n], 1)
    monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", 64)
    asked: list[int] = []

    def region(b):
        asked.append(int(np.prod([y - x for x, y in b])) * 2)
        return a[tuple(slice(x, y) for x, y in b)].copy()

    leaf = ops.reshape(OutLeaf(old, a.dtype, lambda: a, box=region), new)
    want = a.reshape(new)
    for _ in range(10):
        box = []
        for n in new:
            x = int(rng.integers(0, n + 1))
            box.append((x, int(rng.integers(x, n + 1))))
        asked.clear()
        got = leaf.region(tuple(box))
        assert np.array_equal(got, want[tuple(slice(x, y) for x, y in box)]), (old, new, box)
        wanted = got.nbytes
        assert all(n <= max(64, 2 * wanted) for n in asked), (old, new, box, asked)


@pytest.mark.parametrize("bf16", [False, True])
def test_llama_import_and_export_read_big_tensors_by_regions_only(tmp_path, monkeypatch, bf16):
    """With a block limit below every attention weight, the import makes no source tensor
    bigger than the limit whole (the attention kernels go through reshapes), and the tree is
    the same bit for bit as with a limit that holds everything; its export too."""
    import stepsafe
    from stepsafe.convert import safetensors_files
    from stepsafe.convert.hf import export_safetensors, import_safetensors
    from stepsafe.convert.hf_llama import from_hf, to_hf

    if bf16:  # head_dim 64: the query scale 1/8 is exact both ways in bfloat16
        _llama(tmp_path / "hf", heads=2, kv_heads=1, head_dim=64, dtype=torch.bfloat16)
    else:
        _llama(tmp_path / "hf")
    import_safetensors(str(tmp_path / "hf"), str(tmp_path / "whole"), from_hf)
    limit = 1024
    whole_reads: list[tuple[str, int]] = []
    original = safetensors_files._tensor_reader

    def reader(storage, path, start, shape, dtype):
        read = original(storage, path, start, shape, dtype)

        def spy(box=None):
            a = read(box)
            if box is None and a.nbytes > limit:
                whole_reads.append((shape, a.nbytes))
            return a

        return spy

    monkeypatch.setattr(safetensors_files, "_tensor_reader", reader)
    monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", limit)
    import_safetensors(str(tmp_path / "hf"), str(tmp_path / "blocks"), from_hf)
    assert whole_reads == []
    a, b = stepsafe.restore(str(tmp_path / "whole")), stepsafe.restore(str(tmp_path / "blocks"))

    def flat(t, p=""):
        if isinstance(t, dict):
            return {k: v for key, x in t.items() for k, v in flat(x, f"{p}/{key}").items()}
        return {p: np.asarray(t)}

    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k
    export_safetensors(str(tmp_path / "blocks"), str(tmp_path / "out"), to_hf)
    original_weights = safetensors_numpy.load_file(str(tmp_path / "hf" / SINGLE))
    got = safetensors_numpy.load_file(str(tmp_path / "out" / SINGLE))
    assert got.keys() == original_weights.keys()
    for k, w in original_weights.items():
        assert np.array_equal(got[k], w), k


@pytest.mark.parametrize("value", [float("nan"), float("inf"), np.int64(3), {1, 2}, b"x"])
def test_a_config_that_is_not_json_is_refused_and_nothing_is_written(tmp_path, value):
    """NaN and Infinity are no JSON (Python writes them; strict readers refuse the file),
    nor are numpy scalars, sets or bytes: refused before anything is written."""
    from stepsafe.convert.hf import export_safetensors
    from stepsafe.convert.write_tree import write_tree

    storage, path = storage_for(str(tmp_path / "ck"))
    write_tree(storage, path, {"params": {"w": np.ones(3, np.float32)}}, step=0)
    with pytest.raises(ConfigError, match="cannot be written as JSON"):
        export_safetensors(
            str(tmp_path / "ck"), str(tmp_path / "out"), lambda p: {"w": p["w"]},
            config={"rope_theta": value},
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "copy",
    [
        pytest.param(lambda f: dict(f), id="dict"),
        pytest.param(lambda f: {**f}, id="unpacked"),
        pytest.param(lambda f: f.copy(), id="copy"),
        pytest.param(lambda f: (lambda d: (d.update(f), d)[1])({}), id="update"),
    ],
)
def test_a_function_that_copies_the_weights_first_is_not_called_unmapped(copy):
    """``w = dict(flat)`` then popping what it maps is a common way to write a conversion:
    every weight the copy hands out counts as used, as with items()."""
    from stepsafe.convert.hf import map_weights

    leaf = OutLeaf((2,), F32, lambda: np.ones(2, np.float32))
    tree = map_weights([("a", leaf), ("b", leaf)], lambda f: copy(f), "the model")
    assert sorted(tree) == ["a", "b"]
    with pytest.raises(ConfigError, match="'b'"):  # naming alone still is no use
        map_weights([("a", leaf), ("b", leaf)], lambda f: {k: f[k] for k in f if k == "a"}, "m")


def test_a_config_bound_by_functools_partial_is_kept(tmp_path):
    """``partial(from_hf, config=mine)`` for a directory without config.json: the bound
    config is used, not replaced by the directory's (none)."""
    import functools

    from stepsafe.convert.hf import from_safetensors, read_config
    from stepsafe.convert.hf_llama import from_hf

    _llama(tmp_path / "hf")
    config = read_config(str(tmp_path / "hf"))
    (tmp_path / "hf" / "config.json").rename(tmp_path / "elsewhere.json")
    tree = from_safetensors(str(tmp_path / "hf"), functools.partial(from_hf, config=config))
    assert tree["decoder"]["layers"]["self_attention"]["query"]["kernel"].shape == (64, 2, 4, 16)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_regions_at_the_edges_of_files_the_library_wrote(tmp_path, where, monkeypatch):
    """Scalars stacked past the block limit, a (1, 1, N) tensor's inner range, empty regions
    of a tensor with a 0-length axis and of a full one: read as numpy slices them."""
    arrays = {f"s{i}": np.array(i, np.float64) for i in range(20)}
    arrays["e"] = np.zeros((3, 0, 2), np.float32)
    arrays["o"] = np.arange(40, dtype=np.float32).reshape(1, 1, 40)
    safetensors_numpy.save_file(arrays, str(tmp_path / SINGLE))
    url = str(tmp_path)
    if where == "memory":
        url = f"memory://edges/{tmp_path.name}"
        _upload(url, SINGLE, (tmp_path / SINGLE).read_bytes())
    read = dict(read_safetensors(url))
    monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", 64)
    stacked = ops.stack([read[f"s{i}"] for i in range(20)])
    assert np.array_equal(_made(stacked), np.arange(20, dtype=np.float64))
    assert np.array_equal(read["o"].region(((0, 1), (0, 1), (5, 9))), arrays["o"][:, :, 5:9])
    assert read["s3"].region(()) == 3.0
    assert read["e"].region(((0, 3), (0, 0), (0, 2))).shape == (3, 0, 2)
    assert read["o"].region(((0, 1), (0, 1), (7, 7))).shape == (1, 1, 0)


@pytest.mark.parametrize("bucket_url", ["memory"], indirect=True)
@pytest.mark.parametrize("size, readable", [(100_000_000, True), (100_000_001, False)])
def test_a_header_at_the_librarys_size_limit(bucket_url, tmp_path, size, readable):
    """The library reads a header of 100,000,000 bytes and refuses one byte more: so here."""
    body = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    raw = body + b" " * (size - len(body))
    assert _library_refuses(tmp_path, raw, b"\0" * 4) is not readable
    _upload(bucket_url, SINGLE, _file(raw, b"\0" * 4))
    if readable:
        assert [n for n, _ in read_safetensors(bucket_url)] == ["a"]
    else:
        with pytest.raises(CorruptCheckpointError, match="header of"):
            read_safetensors(bucket_url)


@pytest.mark.parametrize("key", ["num_key_value_heads", "head_dim"])
def test_a_config_giving_zero_heads_or_head_dim_is_refused_not_defaulted(tmp_path, key):
    """0 is no count: it must not be taken for "absent" (and replaced by a default that the
    weights' shapes may happen to fit)."""
    from stepsafe.convert.hf import import_safetensors
    from stepsafe.convert.hf_llama import from_hf

    _llama(tmp_path / "hf", kv_heads=4)  # heads = key/value heads: the default would fit
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config[key] = 0
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="must be >= 1"):
        import_safetensors(str(tmp_path / "hf"), str(tmp_path / "mt"), from_hf)


@pytest.mark.parametrize("target", ["../secret/weights.safetensors", "ABSOLUTE", "", ".."])
def test_an_index_naming_a_file_outside_the_model_is_refused(tmp_path, target):
    """A shared model's index must not pull another file of the disk (or bucket) into the
    conversion's output: the files it names are plain names in its own directory."""
    (tmp_path / "secret").mkdir()
    (tmp_path / "model").mkdir()
    secret = tmp_path / "secret" / "weights.safetensors"
    safetensors_numpy.save_file({"private": np.arange(4, dtype=np.float32)}, str(secret))
    shard = "model-00001-of-00002.safetensors"
    safetensors_numpy.save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "model" / shard))
    target = str(secret) if target == "ABSOLUTE" else target
    index = {"metadata": {}, "weight_map": {"w": shard, "private": target}}
    (tmp_path / "model" / INDEX).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="not a file of the model's directory"):
        read_safetensors(str(tmp_path / "model"))


def test_export_never_changes_the_callers_config(tmp_path):
    from stepsafe.convert.hf import export_safetensors
    from stepsafe.convert.write_tree import write_tree

    storage, path = storage_for(str(tmp_path / "ck"))
    write_tree(storage, path, {"params": {"w": np.ones(3, np.float32)}}, step=0)

    def fn(params, config):
        config["rope_scaling"]["factor"] = 99.0  # a function completing a nested entry
        return {"w": params["w"]}

    config = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    export_safetensors(str(tmp_path / "ck"), str(tmp_path / "out"), fn, config=config)
    assert config == {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["rope_scaling"]["factor"] == 99.0


def test_a_tensor_a_shard_holds_but_its_index_omits_is_named_not_dropped(tmp_path):
    """transformers loads every tensor of the files it reads; a weight the index forgot must
    reach the conversion (and be named when unmapped), not vanish from the import."""
    from stepsafe.convert.hf import map_weights

    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    safetensors_numpy.save_file(
        {"a": np.ones(2, np.float32), "bias": np.zeros(2, np.float32)}, str(tmp_path / shards[0])
    )
    safetensors_numpy.save_file({"b": np.ones(2, np.float32)}, str(tmp_path / shards[1]))
    index = {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}}
    (tmp_path / INDEX).write_text(json.dumps(index))
    read = read_safetensors(str(tmp_path))
    assert sorted(n for n, _ in read) == ["a", "b", "bias"]
    with pytest.raises(ConfigError, match="'bias'"):
        map_weights(read, lambda f: {"a": f["a"], "b": f["b"]}, str(tmp_path))
    index["weight_map"]["bias"] = shards[1]  # and one the index puts in another file
    safetensors_numpy.save_file(
        {"b": np.ones(2, np.float32), "bias": np.zeros(2, np.float32)}, str(tmp_path / shards[1])
    )
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="two files"):
        read_safetensors(str(tmp_path))


@pytest.mark.parametrize("limit", [None, 64])
def test_a_source_making_big_endian_or_strided_arrays_writes_the_right_bytes(
    tmp_path, limit, monkeypatch
):
    """Regions and arrays that are views (transposed, strided) or big-endian hold the planned
    values: written as such, whole and block by block, to safetensors the library reads."""
    a = np.arange(96, dtype=np.float32).reshape(8, 12)
    big = a.astype(">f4")
    strided = np.asfortranarray(a)

    def leaf(src):
        return OutLeaf(
            a.shape, F32, lambda: src, box=lambda b: src[tuple(slice(x, y) for x, y in b)]
        )

    if limit is not None:
        monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", limit)
    tensors = [
        ("big", leaf(big)),
        ("strided", leaf(strided)),
        ("stacked", ops.stack([leaf(big), leaf(strided)], axis=1)),
        ("big_planned", ops.as_leaf(big)),
    ]
    write_safetensors(str(tmp_path / "out"), tensors)
    got = safetensors_numpy.load_file(str(tmp_path / "out" / SINGLE))
    assert np.array_equal(got["big"], a) and np.array_equal(got["strided"], a)
    assert np.array_equal(got["stacked"], np.stack([a, a], axis=1))
    assert np.array_equal(got["big_planned"], a) and got["big_planned"].dtype == np.float32


@pytest.mark.parametrize("bucket_url", ["memory", "gcs"], indirect=True)
def test_a_prefix_a_killed_export_left_is_refused_naming_its_claim(bucket_url):
    """A process killed mid-export (no clean-up ran) leaves its claim and some shards, no
    index: no reader takes it for a model, and a new export there is refused, saying why."""
    from stepsafe.convert.safetensors_files import CLAIM

    _upload(bucket_url, CLAIM, b"a stepsafe export is writing this model\n")
    _upload(bucket_url, "model-00001-of-00002.safetensors", b"partial")
    leaves = [("w", OutLeaf((4,), F32, lambda: np.ones(4, np.float32)))]
    with pytest.raises(CheckpointExistsError, match="interrupted"):
        write_safetensors(bucket_url, leaves)
    with pytest.raises(StepsafeError):
        read_safetensors(bucket_url)
    storage, path = storage_for(bucket_url)
    assert sorted(storage.list_dir(path)) == sorted([CLAIM, "model-00001-of-00002.safetensors"])


def test_a_directory_with_one_file_and_an_index_imports_what_transformers_loads(tmp_path):
    """transformers' from_pretrained takes model.safetensors when an index (a stale one) is
    beside it: the import must be of those weights, not the index's shards."""
    model = _llama(tmp_path / "hf")
    shard = "model-00001-of-00001.safetensors"
    stale = {k: np.zeros(v.shape, np.float32) for k, v in model.state_dict().items()}
    safetensors_numpy.save_file(stale, str(tmp_path / "hf" / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for k in stale}}
    (tmp_path / "hf" / INDEX).write_text(json.dumps(index))
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    want = {k: v.numpy() for k, v in loaded.state_dict().items()}
    got = {n: np.asarray(leaf.make()) for n, leaf in read_safetensors(str(tmp_path / "hf"))}
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert np.array_equal(got[name], w), name


def test_a_model_in_hugging_faces_cache_layout_imports(tmp_path):
    """huggingface_hub's cache keeps a model's files in blobs/ and links them from
    snapshots/<revision>/: config.json, the index and the shards are all links. The import
    must read them as transformers does, and equal the import of the plain directory."""
    import stepsafe
    from stepsafe.convert.hf import import_safetensors
    from stepsafe.convert.hf_llama import from_hf

    model = _llama(tmp_path / "plain")
    model.save_pretrained(str(tmp_path / "plain"), max_shard_size="20KB")
    (tmp_path / "blobs").mkdir()
    snapshot = tmp_path / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted((tmp_path / "plain").iterdir())):
        blob = tmp_path / "blobs" / f"{i:040x}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    assert (snapshot / INDEX).is_symlink() and (snapshot / "config.json").is_symlink()
    import_safetensors(str(snapshot), str(tmp_path / "cached"), from_hf)
    import_safetensors(str(tmp_path / "plain"), str(tmp_path / "direct"), from_hf)
    a, b = stepsafe.restore(str(tmp_path / "cached")), stepsafe.restore(str(tmp_path / "direct"))
    q = ("params", "decoder", "layers", "self_attention", "query", "kernel")
    x, y = a, b
    for k in q:
        x, y = x[k], y[k]
    assert np.array_equal(x, y)


def test_layers_of_a_one_axis_array_are_scalars_and_a_scalar_reshapes(tmp_path, monkeypatch):
    """Per-layer scalars stacked as (L,) unstack to 0-d arrays (numpy's ascontiguousarray
    would make them (1,)), written and read back; a (1,) region reshaped to () is 0-d."""
    from stepsafe.convert.stacking import unstack_layers

    a = np.arange(3.0)
    leaf = OutLeaf((3,), a.dtype, lambda: a, box=lambda b: a[b[0][0] : b[0][1]].copy())
    for big in (False, True):  # the one read, and regions of a leaf past the block limit
        if big:
            monkeypatch.setattr(knobs, "CONVERT_BLOCK_BYTES", 64)
            leaf = OutLeaf(
                (30,),
                a.dtype,
                lambda: np.arange(30.0),
                box=lambda b: np.arange(30.0)[b[0][0] : b[0][1]],
            )
        parts = ops.layers(leaf, 0)
        assert [float(p.made()) for p in parts] == list(np.asarray(leaf.make()))
        assert all(p.made().shape == () for p in parts)
    with pytest.raises(ConfigError, match="no axis 0"):  # a 0-d leaf has no layer axis
        unstack_layers({"layers": {"alpha": ops.layers(leaf, 0)[0]}}, axis=0)
    one = OutLeaf((1,), a.dtype, lambda: a[:1], box=lambda b: a[:1][b[0][0] : b[0][1]].copy())
    assert ops.reshape(one, ()).region(()).shape == ()
    write_safetensors(str(tmp_path / "out"), [(f"l{i}", p) for i, p in enumerate(parts)])
    got = safetensors_numpy.load_file(str(tmp_path / "out" / SINGLE))
    assert got["l7"].shape == () and got["l7"] == 7.0


def test_conversion_functions_declaring_config_in_any_way_get_it(tmp_path):
    """config keyword-only, with a default, positional-only (second): given; **kwargs
    alone: not (the function never named it), and it still runs."""
    from stepsafe.convert.hf import map_weights, takes_config

    leaf = OutLeaf((2,), F32, lambda: np.ones(2, np.float32))
    seen = {}

    def keyword_only(flat, *, config):
        seen["keyword_only"] = config
        return dict(flat)

    def defaulted(flat, config=None):
        seen["defaulted"] = config
        return dict(flat)

    def positional_only(flat, config, /):
        seen["positional_only"] = config
        return dict(flat)

    def kwargs_only(flat, **kwargs):
        seen["kwargs_only"] = kwargs.get("config", "none")
        return dict(flat)

    for fn in (keyword_only, defaulted, positional_only, kwargs_only):
        extra = {"config": {"k": 1}} if takes_config(fn) else {}
        map_weights([("a", leaf)], fn, "m", **extra)
    assert seen == {
        "keyword_only": {"k": 1},
        "defaulted": {"k": 1},
        "positional_only": {"k": 1},
        "kwargs_only": "none",
    }
