"""Llama LoRA adapters that PEFT itself trained and saved (``stepsafe.convert.peft_llama``):
a small ``transformers`` Llama (random weights, no network) is saved as the base, PEFT adapts
it (random lora_B), saves the adapter and merges it (``merge_and_unload``); the base imported
by ``hf_llama.from_hf``, the adapter by ``peft_llama``, merged by stepsafe's ``merge_lora``,
equals ``from_hf`` of PEFT's merged model. Adapters of some modules, the CLI, and refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # never the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.numpy import load_file  # noqa: E402
from trees import assert_bit_exact  # noqa: E402

import stepsafe  # noqa: E402
from stepsafe.cli.main import main  # noqa: E402
from stepsafe.convert import import_peft, load_adapter, merge_lora  # noqa: E402
from stepsafe.convert.hf import import_safetensors, read_config  # noqa: E402
from stepsafe.convert.hf_llama import from_hf, rotary_interleave  # noqa: E402
from stepsafe.convert.peft_llama import from_peft  # noqa: E402
from stepsafe.errors import ConfigError  # noqa: E402

LAYERS, HIDDEN, HEADS, KV_HEADS, WIDTH, VOCAB, R, ALPHA = 2, 64, 4, 2, 96, 128, 4, 8
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# PEFT module -> MaxText's module under decoder/layers
MAXTEXT = {
    "q_proj": ("self_attention", "query"),
    "k_proj": ("self_attention", "key"),
    "v_proj": ("self_attention", "value"),
    "o_proj": ("self_attention", "out"),
    "gate_proj": ("mlp", "wi_0"),
    "up_proj": ("mlp", "wi_1"),
    "down_proj": ("mlp", "wo"),
}
A_NAME = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight"


def write_models(root, *, head_dim=16, targets=ALL, layers=LAYERS, kind="Llama"):
    """``root/base`` (the model), ``root/peft`` (PEFT's adapter of it, random lora_B) and
    ``root/merged`` (PEFT's ``merge_and_unload``), each saved by its library."""
    config = getattr(transformers, f"{kind}Config")(
        num_hidden_layers=layers, hidden_size=HIDDEN, intermediate_size=WIDTH,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=head_dim,
        vocab_size=VOCAB, tie_word_embeddings=False,
    )  # fmt: skip
    model = getattr(transformers, f"{kind}ForCausalLM")(config)
    rng = np.random.default_rng(head_dim + len(targets))
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32) * 0.2))
    model.save_pretrained(str(root / "base"))
    adapted = peft.get_peft_model(
        model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(targets))
    )
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:  # PEFT starts it at zero: no change to merge
                p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32)))
    adapted.save_pretrained(str(root / "peft"))
    adapted.merge_and_unload().save_pretrained(str(root / "merged"))


def imported_and_merged(root, config):
    """stepsafe's merge of the imported adapter into the imported base, and ``from_hf`` of
    PEFT's merged model: both params trees."""
    import_safetensors(str(root / "base"), str(root / "mt_base"), from_hf)
    import_safetensors(str(root / "merged"), str(root / "mt_want"), from_hf)
    import_peft(str(root / "peft"), str(root / "adapters" / "llama"), from_peft, base_config=config)
    merge_lora(str(root / "mt_base"), str(root / "adapters" / "llama"), str(root / "mt_got"))
    got = stepsafe.restore(str(root / "mt_got"))["params"]
    want = stepsafe.restore(str(root / "mt_want"))["params"]
    base = stepsafe.restore(str(root / "mt_base"))["params"]
    return got, want, base


def kernels(params, modules):
    layers = params["decoder"]["layers"]
    return {m: layers[MAXTEXT[m][0]][MAXTEXT[m][1]]["kernel"] for m in modules}


def assert_merge_matches(got, want, base, targets):
    """Adapted kernels within float32 rounding of PEFT's merge (and changed by it); every
    other weight the base's bit for bit. Returns the adapted modules that are bit-exact."""
    exact = []
    for m, have in kernels(got, targets).items():
        theirs, before = kernels(want, [m])[m], kernels(base, [m])[m]
        assert have.dtype == theirs.dtype == np.float32 and have.shape == theirs.shape, m
        np.testing.assert_allclose(have, theirs, rtol=1e-6, atol=1e-6, err_msg=m)
        assert np.abs(have - before).max() > 0.1, f"{m}: the adapter changed nothing"
        exact += [m] * (have.tobytes() == theirs.tobytes())
    others = [m for m in ALL if m not in targets]
    assert_bit_exact(kernels(got, others), kernels(base, others))
    assert_bit_exact(kernels(want, others), kernels(base, others))
    for tree in (got, want):  # norms, embeddings, logits: untouched
        rest = {k: v for k, v in tree["decoder"]["layers"].items() if "norm" in k}
        assert_bit_exact(rest, {k: base["decoder"]["layers"][k] for k in rest})
        assert_bit_exact(tree["token_embedder"], base["token_embedder"])
    return exact


@pytest.mark.parametrize("head_dim", [16, 64, 32])
def test_merge_of_imports_equals_import_of_peft_merge(tmp_path, head_dim):
    write_models(tmp_path, head_dim=head_dim)
    got, want, base = imported_and_merged(tmp_path, read_config(tmp_path / "base"))
    exact = assert_merge_matches(got, want, base, ALL)
    # bit for bit where 1/sqrt(K) is a power of two (the scaling is exact, the float32 sums
    # round alike); K = 32 rounds the query's kernel twice (W·s, then + A·(B·s))
    assert set(exact) == set(ALL) - ({"q_proj"} if head_dim == 32 else set()) or (
        head_dim == 32 and set(exact) == set(ALL)
    )


def test_adapter_tree_is_maxtexts_layout(tmp_path):
    write_models(tmp_path)
    import_peft(str(tmp_path / "peft"), str(tmp_path / "ad"), from_peft,
                base_config=read_config(tmp_path / "base"))  # fmt: skip
    config, params = load_adapter(str(tmp_path / "ad"))
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (R, ALPHA, sorted(ALL))
    assert stepsafe.info(str(tmp_path / "ad" / "0")).custom_metadata["lora_scan_axis"] == 1
    layers, k, q_out = params["decoder"]["layers"], 16, HEADS * 16
    shapes = {
        ("self_attention", "query"): ((HIDDEN, LAYERS, R), (R, LAYERS, HEADS, k)),
        ("self_attention", "key"): ((HIDDEN, LAYERS, R), (R, LAYERS, KV_HEADS, k)),
        ("self_attention", "value"): ((HIDDEN, LAYERS, R), (R, LAYERS, KV_HEADS, k)),
        ("self_attention", "out"): ((HEADS, LAYERS, k, R), (R, LAYERS, HIDDEN)),
        ("mlp", "wi_0"): ((HIDDEN, LAYERS, R), (R, LAYERS, WIDTH)),
        ("mlp", "wi_1"): ((HIDDEN, LAYERS, R), (R, LAYERS, WIDTH)),
        ("mlp", "wo"): ((WIDTH, LAYERS, R), (R, LAYERS, HIDDEN)),
    }
    got = {p: (layers[p[0]][p[1]]["lora_a.kernel"].shape, layers[p[0]][p[1]]["lora_b.kernel"].shape)
           for p in shapes}  # fmt: skip
    assert got == shapes
    raw = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    query = layers["self_attention"]["query"]
    b = raw[A_NAME.format(1, "q_proj", "B")].T.reshape(R, HEADS, k)[..., rotary_interleave(k)]
    assert_bit_exact(query["lora_b.kernel"][:, 1], b / 4)
    assert_bit_exact(query["lora_a.kernel"][:, 1], raw[A_NAME.format(1, "q_proj", "A")].T)
    a = raw[A_NAME.format(0, "o_proj", "A")].T.reshape(HEADS, k, R)
    assert_bit_exact(layers["self_attention"]["out"]["lora_a.kernel"][:, 0], a)
    assert raw[A_NAME.format(0, "o_proj", "A")].shape == (R, q_out)


def test_an_adapter_of_q_and_v_merges_those_alone(tmp_path):
    write_models(tmp_path, targets=["q_proj", "v_proj"])
    got, want, base = imported_and_merged(tmp_path, read_config(tmp_path / "base"))
    assert sorted(assert_merge_matches(got, want, base, ["q_proj", "v_proj"])) == [
        "q_proj",
        "v_proj",
    ]
    _, params = load_adapter(str(tmp_path / "adapters" / "llama"))
    assert list(params["decoder"]["layers"]) == ["self_attention"]
    assert sorted(params["decoder"]["layers"]["self_attention"]) == ["query", "value"]


def test_a_mistral_adapter_imports_alike(tmp_path):
    write_models(tmp_path, kind="Mistral", targets=["q_proj", "k_proj", "o_proj", "up_proj"])
    got, want, base = imported_and_merged(tmp_path, read_config(tmp_path / "base"))
    assert_merge_matches(got, want, base, ["q_proj", "k_proj", "o_proj", "up_proj"])


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_an_mlp_adapter_needs_no_config_through_the_cli(tmp_path, capsys):
    write_models(tmp_path, targets=["gate_proj", "up_proj", "down_proj"])
    for src, dst in (("base", "mt_base"), ("merged", "mt_want")):
        code, _, err = cli(
            capsys, "convert", tmp_path / src, tmp_path / dst, "--from", "safetensors",
            "--conversion-fn", "stepsafe.convert.hf_llama:from_hf", "--no-progress",
        )  # fmt: skip
        assert code == 0, err
    code, out, err = cli(
        capsys, "convert", tmp_path / "peft", tmp_path / "adapters" / "mlp", "--from", "peft",
        "--conversion-fn", "stepsafe.convert.peft_llama:from_peft", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert f"LoRA adapter, r={R}, lora_alpha={ALPHA}" in out
    code, out, err = cli(
        capsys, "convert", tmp_path / "mt_base", tmp_path / "mt_got",
        "--merge-lora", tmp_path / "adapters" / "mlp", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "3 module(s) merged" in out
    got, want, base = (
        stepsafe.restore(str(tmp_path / d))["params"] for d in ("mt_got", "mt_want", "mt_base")
    )
    exact = assert_merge_matches(got, want, base, ["gate_proj", "up_proj", "down_proj"])
    assert sorted(exact) == ["down_proj", "gate_proj", "up_proj"]


def test_attention_without_the_base_config_is_refused(tmp_path, capsys):
    write_models(tmp_path, targets=["q_proj", "down_proj"])
    with pytest.raises(ConfigError, match=r"self_attn\.q_proj, whose head counts.*--hf-config"):
        import_peft(str(tmp_path / "peft"), str(tmp_path / "a"), from_peft)
    code, _, err = cli(
        capsys, "convert", tmp_path / "peft", tmp_path / "b", "--from", "peft",
        "--conversion-fn", "stepsafe.convert.peft_llama:from_peft", "--no-progress",
    )  # fmt: skip
    assert code != 0 and "--hf-config" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_another_bases_config_is_refused(tmp_path):
    write_models(tmp_path / "k16", targets=["q_proj", "o_proj"])
    write_models(tmp_path / "k32", head_dim=32, targets=["q_proj"], layers=3)
    with pytest.raises(ConfigError, match=r"has 64 features.*4 heads x head_dim 32"):
        other = {**read_config(tmp_path / "k32" / "base"), "num_hidden_layers": LAYERS}
        from_peft(load_file(str(tmp_path / "k16" / "peft" / "adapter_model.safetensors")), other)
    with pytest.raises(ConfigError, match=r"the adapter has 2 layer.*the base config 3"):
        import_peft(str(tmp_path / "k16" / "peft"), str(tmp_path / "a"), from_peft,
                    base_config=read_config(tmp_path / "k32" / "base"))  # fmt: skip
    assert not (tmp_path / "a").exists()


def test_tensors_of_other_modules_are_refused_by_name(tmp_path):
    write_models(tmp_path, targets=["q_proj", "lm_head"])
    with pytest.raises(
        ConfigError, match=r"3 tensor\(s\).*'base_model\.model\.lm_head\.base_layer"
    ):
        import_peft(str(tmp_path / "peft"), str(tmp_path / "a"), from_peft,
                    base_config=read_config(tmp_path / "base"))  # fmt: skip
    assert not (tmp_path / "a").exists()


def test_a_layer_missing_a_tensor_is_refused(tmp_path):
    write_models(tmp_path, targets=["q_proj", "v_proj"])
    flat = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    config = read_config(tmp_path / "base")
    del flat[A_NAME.format(1, "v_proj", "B")]
    with pytest.raises(ConfigError, match=r"self_attn\.v_proj has no lora_A and lora_B in.*\[1\]"):
        from_peft(flat, config)
    with pytest.raises(ConfigError, match="no Llama LoRA tensors"):
        from_peft({}, config)
    with pytest.raises(ConfigError, match="does not give the attention heads"):
        from_peft(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), {})


def test_an_attention_adapter_imports_through_the_cli_with_the_base_config(tmp_path, capsys):
    write_models(tmp_path, targets=["q_proj", "k_proj", "o_proj"])
    code, _, err = cli(
        capsys, "convert", tmp_path / "peft", tmp_path / "adapters" / "llama", "--from", "peft",
        "--conversion-fn", "stepsafe.convert.peft_llama:from_peft",
        "--hf-config", tmp_path / "base", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    import_safetensors(str(tmp_path / "base"), str(tmp_path / "mt_base"), from_hf)
    import_safetensors(str(tmp_path / "merged"), str(tmp_path / "mt_want"), from_hf)
    merge_lora(str(tmp_path / "mt_base"), str(tmp_path / "adapters" / "llama"),
               str(tmp_path / "mt_got"))  # fmt: skip
    got, want, base = (
        stepsafe.restore(str(tmp_path / d))["params"] for d in ("mt_got", "mt_want", "mt_base")
    )
    assert_merge_matches(got, want, base, ["q_proj", "k_proj", "o_proj"])
