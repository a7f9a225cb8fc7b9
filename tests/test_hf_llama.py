"""Llama's Hugging Face weights <-> MaxText's tree (``stepsafe.convert.hf_llama``), on models
``transformers`` itself built from small configs (random weights, no network) and saved
(sharded, float32 and bfloat16, tied and untied): imported as MaxText's scanned tree, exported
back bit for bit and loaded by ``transformers`` with no key missing or unexpected; a forward
pass written in MaxText's conventions (query pre-scaled, interleaved RoPE) on the imported tree
gives ``transformers``' logits; unmapped, missing and misconfigured weights are named."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # never the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import stepsafe
from stepsafe.cli.main import main
from stepsafe.convert.hf import (
    export_safetensors,
    from_safetensors,
    import_safetensors,
    load_safetensors_parameters,
    read_config,
    takes_config,
)
from stepsafe.convert.hf_llama import from_hf, rotary_interleave, to_hf
from stepsafe.convert.kinds import convert_checkpoint
from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.convert.source import open_source, source_tree
from stepsafe.errors import CheckpointNotFoundError, ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

LAYERS, HIDDEN, HEADS, KV_HEADS, WIDTH, VOCAB = 2, 64, 4, 2, 96, 128
EMBED = "model.embed_tokens.weight"


def llama(directory, *, head_dim=16, tied=False, dtype=None, shard=None, kind="Llama"):
    """A small Llama with random weights (larger than its initialiser's, norms too, so that
    a wrong permutation or scale shows in the logits), saved by ``save_pretrained``."""
    config = getattr(transformers, f"{kind}Config")(
        num_hidden_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=WIDTH,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=head_dim,
        vocab_size=VOCAB, tie_word_embeddings=tied,
    )  # fmt: skip
    model = getattr(transformers, f"{kind}ForCausalLM")(config)
    rng = np.random.default_rng(head_dim + tied)
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = rng.standard_normal(tuple(p.shape)).astype(np.float32) * 0.2
            p.copy_(torch.from_numpy(w + (1.0 if name.endswith("norm.weight") else 0.0)))
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(directory), **kwargs)
    return model


def leaves(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in leaves(v)]
    return [tree]


def loaded(directory, dtype, kind="Llama"):
    model, info = getattr(transformers, f"{kind}ForCausalLM").from_pretrained(
        str(directory), dtype=dtype, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return model


def assert_same_weights(got, want):
    a, b = got.state_dict(), want.state_dict()
    assert set(a) == set(b)
    for name in b:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_sharded_float32_model_imports_as_maxtext_tree_and_exports_bit_for_bit(tmp_path):
    model = llama(tmp_path / "hf", shard="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    import_safetensors(str(tmp_path / "hf"), str(tmp_path / "mt"), from_hf)
    params = stepsafe.restore(str(tmp_path / "mt"))["params"]
    layers = params["decoder"]["layers"]
    attention, mlp, k = layers["self_attention"], layers["mlp"], 16
    shapes = {  # MaxText's, layers on axis 1
        "query": (attention["query"]["kernel"].shape, (HIDDEN, LAYERS, HEADS, k)),
        "key": (attention["key"]["kernel"].shape, (HIDDEN, LAYERS, KV_HEADS, k)),
        "value": (attention["value"]["kernel"].shape, (HIDDEN, LAYERS, KV_HEADS, k)),
        "out": (attention["out"]["kernel"].shape, (HEADS, LAYERS, k, HIDDEN)),
        "wi_0": (mlp["wi_0"]["kernel"].shape, (HIDDEN, LAYERS, WIDTH)),
        "wi_1": (mlp["wi_1"]["kernel"].shape, (HIDDEN, LAYERS, WIDTH)),
        "wo": (mlp["wo"]["kernel"].shape, (WIDTH, LAYERS, HIDDEN)),
        "pre": (layers["pre_self_attention_layer_norm"]["scale"].shape, (HIDDEN, LAYERS)),
        "post": (layers["post_self_attention_layer_norm"]["scale"].shape, (HIDDEN, LAYERS)),
        "norm": (params["decoder"]["decoder_norm"]["scale"].shape, (HIDDEN,)),
        "logits": (params["decoder"]["logits_dense"]["kernel"].shape, (HIDDEN, VOCAB)),
        "embed": (params["token_embedder"]["embedding"].shape, (VOCAB, HIDDEN)),
    }
    assert {n: got for n, (got, _) in shapes.items()} == {n: w for n, (_, w) in shapes.items()}
    sd = {n: t.numpy() for n, t in model.state_dict().items()}
    up = sd["model.layers.1.mlp.up_proj.weight"]
    np.testing.assert_array_equal(mlp["wi_1"]["kernel"][:, 1], up.T)
    q = sd["model.layers.1.self_attn.q_proj.weight"].T.reshape(HIDDEN, HEADS, k) / 4
    np.testing.assert_array_equal(attention["query"]["kernel"][:, 1], q[..., rotary_interleave(k)])

    lazy = from_safetensors(str(tmp_path / "hf"), from_hf)  # nothing made yet: one at a time
    assert all(isinstance(leaf, OutLeaf) for leaf in leaves(lazy))
    named = to_hf(source_tree(open_source(str(tmp_path / "mt")))["params"])
    assert len(named) == 3 + 9 * LAYERS and all(isinstance(w, OutLeaf) for w in named.values())
    files = export_safetensors(
        str(tmp_path / "mt"), str(tmp_path / "out"), to_hf,
        config=read_config(str(tmp_path / "hf")), max_shard_bytes=1 << 15,
    )  # fmt: skip
    assert {"model.safetensors.index.json", "config.json"} <= set(files)
    assert_same_weights(loaded(tmp_path / "out", torch.float32), model)


def test_bfloat16_tied_model_with_head_dim_64_round_trips_with_an_inferred_config(tmp_path):
    model = llama(tmp_path / "hf", head_dim=64, tied=True, dtype=torch.bfloat16)
    import_safetensors(str(tmp_path / "hf"), str(tmp_path / "mt"), from_hf)
    params = stepsafe.restore(str(tmp_path / "mt"))["params"]
    assert "logits_dense" not in params["decoder"]  # MaxText's logits_via_embedding
    query = params["decoder"]["layers"]["self_attention"]["query"]["kernel"]
    assert query.shape == (HIDDEN, LAYERS, HEADS, 64) and query.dtype.name == "bfloat16"
    export_safetensors(str(tmp_path / "mt"), str(tmp_path / "out"), to_hf)  # no config given
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["head_dim"] == 64
    assert config["num_key_value_heads"] == KV_HEADS and config["dtype"] == "bfloat16"
    assert "lm_head.weight" not in safetensors_numpy.load_file(
        str(tmp_path / "out" / "model.safetensors")
    )
    assert_same_weights(loaded(tmp_path / "out", torch.bfloat16), model)


def test_unscanned_tree_exports_the_same_weights(tmp_path):
    model = llama(tmp_path / "hf")
    import_safetensors(str(tmp_path / "hf"), str(tmp_path / "mt"), from_hf)
    convert_checkpoint(str(tmp_path / "mt"), str(tmp_path / "un"), unstack=True, scan_axis=1)
    assert "layers_1" in stepsafe.restore(str(tmp_path / "un"))["params"]["decoder"]
    export_safetensors(str(tmp_path / "un"), str(tmp_path / "out"), to_hf)
    assert_same_weights(loaded(tmp_path / "out", torch.float32), model)


def rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope_interleaved(x, theta):
    """MaxText's rotary embedding: features 2j and 2j+1 rotated by position * theta^(-2j/K)."""
    t, k = x.shape[0], x.shape[-1]
    angle = np.arange(t)[:, None] * theta ** (-np.arange(0, k, 2) / k)[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, odd * cos + even * sin
    return out


def maxtext_forward(params, tokens, eps, theta):
    """A Llama forward pass in MaxText's conventions, in float64: queries pre-scaled (the
    scores are not divided by sqrt(head_dim)), interleaved RoPE, layers on axis 1."""
    p = {k: v for k, v in params.items()}
    embedding = np.asarray(p["token_embedder"]["embedding"], np.float64)
    layers = p["decoder"]["layers"]
    attention, mlp = layers["self_attention"], layers["mlp"]
    x, t = embedding[tokens], len(tokens)
    causal = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(attention["query"]["kernel"].shape[1]):
        h = rms(x, layers["pre_self_attention_layer_norm"]["scale"][:, i], eps)
        q, k, v = (
            np.einsum("td,dhk->thk", h, attention[n]["kernel"][:, i])
            for n in ("query", "key", "value")
        )
        q, k = rope_interleaved(q, theta), rope_interleaved(k, theta)
        repeat = q.shape[1] // k.shape[1]
        k, v = np.repeat(k, repeat, axis=1), np.repeat(v, repeat, axis=1)
        scores = np.einsum("qhk,shk->hqs", q, k) + causal
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        heads = np.einsum("hqs,shk->qhk", weights, v)
        x = x + np.einsum("qhk,hkd->qd", heads, attention["out"]["kernel"][:, i])
        h = rms(x, layers["post_self_attention_layer_norm"]["scale"][:, i], eps)
        gate, up = h @ mlp["wi_0"]["kernel"][:, i], h @ mlp["wi_1"]["kernel"][:, i]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ mlp["wo"]["kernel"][:, i]
    x = rms(x, p["decoder"]["decoder_norm"]["scale"], eps)
    logits = p["decoder"].get("logits_dense", {}).get("kernel")
    return x @ (embedding.T if logits is None else logits)


@pytest.mark.parametrize("tied", [False, True])
def test_imported_tree_in_maxtexts_conventions_gives_transformers_logits(tmp_path, tied):
    model = llama(tmp_path / "hf", tied=tied)
    import_safetensors(str(tmp_path / "hf"), str(tmp_path / "mt"), from_hf)
    params = stepsafe.restore(str(tmp_path / "mt"))["params"]
    tokens = np.random.default_rng(0).integers(0, VOCAB, 12)
    with torch.no_grad():
        want = model(torch.tensor(tokens)[None]).logits[0].numpy()
    theta = model.config.rope_parameters["rope_theta"]
    got = maxtext_forward(params, tokens, model.config.rms_norm_eps, theta)
    assert np.abs(want).max() > 1  # logits big enough to tell a wrong mapping
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    wrong = {**params, "decoder": {**params["decoder"]}}  # the half-split layout, unpermuted
    q = params["decoder"]["layers"]["self_attention"]["query"]["kernel"]
    unpermuted = q[..., np.argsort(rotary_interleave(q.shape[-1]))]
    wrong["decoder"]["layers"] = {
        **params["decoder"]["layers"],
        "self_attention": {
            **params["decoder"]["layers"]["self_attention"], "query": {"kernel": unpermuted}
        },
    }  # fmt: skip
    assert not np.allclose(maxtext_forward(wrong, tokens, model.config.rms_norm_eps, theta), want)


def single_file_weights(tmp_path):
    llama(tmp_path / "hf")
    return safetensors_numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))


def resaved(tmp_path, name, weights, config=True):
    (tmp_path / name).mkdir()
    safetensors_numpy.save_file(weights, str(tmp_path / name / "model.safetensors"))
    if config:
        (tmp_path / name / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    return str(tmp_path / name)


def test_unmapped_missing_and_misconfigured_weights_are_named(tmp_path):
    weights = single_file_weights(tmp_path)
    extra = {**weights, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
    with pytest.raises(
        ConfigError, match=r"not mapped .*'model\.layers\.0\.self_attn\.q_proj\.bias'"
    ):
        import_safetensors(resaved(tmp_path, "extra", extra), str(tmp_path / "x"), from_hf)
    missing = {n: w for n, w in weights.items() if n != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ConfigError, match=r"wants weight 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        import_safetensors(resaved(tmp_path, "missing", missing), str(tmp_path / "x"), from_hf)
    untied = {n: w for n, w in weights.items() if n != "lm_head.weight"}  # config: not tied
    with pytest.raises(ConfigError, match=r"wants weight 'lm_head\.weight'"):
        import_safetensors(resaved(tmp_path, "untied", untied), str(tmp_path / "x"), from_hf)
    tied = {**json.loads((tmp_path / "hf" / "config.json").read_text()), "tie_word_embeddings": 1}
    path = resaved(tmp_path, "tied", {**weights, "lm_head.weight": weights[EMBED]})
    (tmp_path / "tied" / "config.json").write_text(json.dumps(tied))
    import_safetensors(path, str(tmp_path / "t"), from_hf)  # a saved copy of tied embeddings
    assert "logits_dense" not in stepsafe.restore(str(tmp_path / "t"))["params"]["decoder"]
    with pytest.raises(ConfigError, match=r"needs the model's config\.json"):
        path = resaved(tmp_path, "no-config", weights, config=False)
        import_safetensors(path, str(tmp_path / "x"), from_hf)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "other").mkdir()
    safetensors_numpy.save_file(weights, str(tmp_path / "other" / "model.safetensors"))
    wrong = {**config, "num_attention_heads": 2, "head_dim": 16}
    (tmp_path / "other" / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(ConfigError, match=r"q_proj\.weight is \(64, 64\), config.json's heads"):
        import_safetensors(str(tmp_path / "other"), str(tmp_path / "x"), from_hf)
    (tmp_path / "other" / "config.json").write_text("[1, 2]")
    with pytest.raises(stepsafe.CorruptCheckpointError, match=r"not a JSON object"):
        import_safetensors(str(tmp_path / "other"), str(tmp_path / "x"), from_hf)
    assert not (tmp_path / "x").exists()


def test_export_refuses_a_config_that_disagrees_with_the_weights(tmp_path):
    llama(tmp_path / "hf")
    import_safetensors(str(tmp_path / "hf"), str(tmp_path / "mt"), from_hf)
    config = {**read_config(str(tmp_path / "hf")), "num_key_value_heads": 4}
    with pytest.raises(ConfigError, match=r"num_key_value_heads 4 \(the weights: 2\)"):
        export_safetensors(str(tmp_path / "mt"), str(tmp_path / "out"), to_hf, config=config)
    tied = {**read_config(str(tmp_path / "hf")), "tie_word_embeddings": True}
    with pytest.raises(ConfigError, match=r"tie_word_embeddings True \(the weights: False\)"):
        export_safetensors(str(tmp_path / "mt"), str(tmp_path / "out"), to_hf, config=tied)
    tree = source_tree(open_source(str(tmp_path / "mt")))["params"]
    query = tree["decoder"]["layers"]["self_attention"]["query"]
    query["bias"] = np.zeros((HEADS, LAYERS, 16), np.float32)
    with pytest.raises(ConfigError, match=r"1 weight\(s\) .* no Hugging Face Llama name: "
                       r"decoder/layers/self_attention/query/bias"):  # fmt: skip
        to_hf(tree)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointNotFoundError, match=r"no Hugging Face config"):
        read_config(str(tmp_path / "nothing.json"))


def test_a_config_goes_to_functions_that_take_one(tmp_path):
    seen = []

    def one(flat):
        return {"w": flat["w"]}

    def two(flat, config=None):
        seen.append(config)
        return {"w": flat["w"]}

    def keyword(flat, *, config):
        seen.append(config)
        return {"w": flat["w"]}

    assert not takes_config(one) and takes_config(two) and takes_config(keyword)
    assert takes_config(from_hf) and takes_config(to_hf) and not takes_config(len)
    (tmp_path / "hf").mkdir()
    safetensors_numpy.save_file({"w": np.ones(3, np.float32)}, str(tmp_path / "hf" / SINGLE))
    for i, fn in enumerate((one, two)):
        import_safetensors(str(tmp_path / "hf"), str(tmp_path / f"a{i}"), fn)
    (tmp_path / "hf" / "config.json").write_text('{"hidden_size": 3}')
    import_safetensors(str(tmp_path / "hf"), str(tmp_path / "b"), keyword)
    assert seen == [None, {"hidden_size": 3}]
    given = {"model_type": "x"}
    files = export_safetensors(str(tmp_path / "b"), str(tmp_path / "out"), one, config=given)
    assert sorted(files) == sorted([SINGLE, "config.json"])
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == given
    files = export_safetensors(str(tmp_path / "b"), str(tmp_path / "none"), one)
    assert files == [SINGLE]  # no config given, none made: none written


SINGLE = "model.safetensors"


def test_cli_imports_and_exports_a_llama(tmp_path, capsys):
    model = llama(tmp_path / "hf", shard="20KB")
    fn = "stepsafe.convert.hf_llama"
    args = ["--from", "safetensors", "--conversion-fn", f"{fn}:from_hf", "--no-progress"]
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "mt"), *args]) == 0
    args = ["--to", "safetensors", "--conversion-fn", f"{fn}:to_hf", "--no-progress"]
    assert main(["convert", str(tmp_path / "mt"), str(tmp_path / "out"), *args]) == 0
    assert "config.json" in capsys.readouterr().out
    assert_same_weights(loaded(tmp_path / "out", torch.float32), model)


def test_mistral_named_alike_round_trips(tmp_path):
    model = llama(tmp_path / "hf", kind="Mistral", shard="40KB")
    import_safetensors(str(tmp_path / "hf"), str(tmp_path / "mt"), from_hf)
    config = read_config(str(tmp_path / "hf"))
    export_safetensors(str(tmp_path / "mt"), str(tmp_path / "out"), to_hf, config=config)
    assert read_config(str(tmp_path / "out"))["model_type"] == "mistral"
    assert_same_weights(loaded(tmp_path / "out", torch.float32, kind="Mistral"), model)


def test_head_dim_128_round_trips_within_a_rounding_and_loads_onto_a_target(tmp_path):
    model = llama(tmp_path / "hf", head_dim=128)  # 1/sqrt(128) is not a power of two
    import_safetensors(str(tmp_path / "hf"), str(tmp_path / "mt"), from_hf)
    params = stepsafe.restore(str(tmp_path / "mt"))["params"]
    target = {"decoder": params["decoder"], "token_embedder": params["token_embedder"]}
    placed = load_safetensors_parameters(str(tmp_path / "hf"), target, from_hf)  # the trainer's
    np.testing.assert_array_equal(
        placed["decoder"]["layers"]["self_attention"]["query"]["kernel"],
        params["decoder"]["layers"]["self_attention"]["query"]["kernel"],
    )
    export_safetensors(str(tmp_path / "mt"), str(tmp_path / "out"), to_hf)
    back = loaded(tmp_path / "out", torch.float32).state_dict()
    for name, want in model.state_dict().items():
        if name.endswith("q_proj.weight"):  # scaled there and back: a rounding each way
            torch.testing.assert_close(back[name], want, rtol=3e-7, atol=0)
        else:
            assert torch.equal(back[name], want), name
