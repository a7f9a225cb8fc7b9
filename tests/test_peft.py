"""Hugging Face PEFT adapters, written by the real ``peft`` library (``save_pretrained``), imported
into MaxText's adapter layout and merged: the merge equals W + B@A*alpha/r computed by numpy and
by PEFT's own ``merge_and_unload``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from torch import nn  # noqa: E402
from trees import assert_bit_exact  # noqa: E402

import stepsafe  # noqa: E402
from stepsafe.convert import import_peft, load_adapter, merge_lora  # noqa: E402
from stepsafe.convert.peft_demo import from_peft  # noqa: E402
from stepsafe.errors import CheckpointNotFoundError, ConfigError  # noqa: E402

D, L, R, ALPHA = 8, 2, 4, 12


class Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)


class Layer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.self_attn = Attn(d)


class Inner(nn.Module):
    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(d) for _ in range(n)])


class DemoTorch(nn.Module):
    """A torch model named as the demo model's Hugging Face names (convert/hf_demo.py)."""

    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.model = Inner(d, n)


def write_peft(directory, d=D, n=L, r=R, alpha=ALPHA, targets=("qkv_proj", "o_proj"), **kw):
    """A PEFT adapter saved by peft itself, its lora_B random (peft starts it at zero)."""
    model = peft.get_peft_model(
        DemoTorch(d, n), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **kw)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(str(directory))
    return model


def base_weights(model, n=L) -> dict[str, list[np.ndarray]]:
    """The torch model's base weights ([out, in]) per module, per layer."""
    layers = model.base_model.model.model.layers
    return {
        m: [
            getattr(layers[i].self_attn, m).base_layer.weight.detach().numpy().copy()
            for i in range(n)
        ]
        for m in ("qkv_proj", "o_proj")
    }


def test_import_writes_maxtexts_layout_bit_exact(tmp_path):
    write_peft(tmp_path / "peft")
    config = import_peft(str(tmp_path / "peft"), str(tmp_path / "ad" / "mine"), from_peft,
                         scan_axis=0)  # fmt: skip
    assert (config.r, config.lora_alpha) == (R, ALPHA)
    root = tmp_path / "ad" / "mine"
    assert (root / "0" / "items").is_dir()
    doc = json.loads((root / "adapter_config.json").read_text())
    assert doc["r"] == R and doc["lora_alpha"] == ALPHA and doc["peft_type"] == "LORA"
    assert sorted(doc["target_modules"]) == ["o_proj", "qkv_proj"]
    _, params = load_adapter(str(root))
    from safetensors.numpy import load_file

    raw = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for ours, theirs in (("qkv", "qkv_proj"), ("out", "o_proj")):
        pair = params["decoder"]["layers"]["attention"][ours]
        name = f"base_model.model.model.layers.{{}}.self_attn.{theirs}.lora_{{}}.weight"
        want_a = np.stack([raw[name.format(i, "A")].T for i in range(L)])
        want_b = np.stack([raw[name.format(i, "B")].T for i in range(L)])
        assert_bit_exact(pair["lora_a.kernel"], want_a)
        assert_bit_exact(pair["lora_b.kernel"], want_b)
        assert pair["lora_a.kernel"].shape == (L, D, R)


def test_merge_equals_numpy_and_peft_merge_and_unload(tmp_path):
    model = write_peft(tmp_path / "peft")
    import_peft(str(tmp_path / "peft"), str(tmp_path / "ad" / "a"), from_peft, scan_axis=0)
    w = base_weights(model)
    base = {
        "decoder": {
            "layers": {
                "attention": {
                    "qkv": {"kernel": np.stack([x.T for x in w["qkv_proj"]])},
                    "out": {"kernel": np.stack([x.T for x in w["o_proj"]])},
                }
            }
        }
    }
    stepsafe.save(str(tmp_path / "base"), {"params": base})
    merge_lora(str(tmp_path / "base"), str(tmp_path / "ad" / "a"), str(tmp_path / "merged"))
    got = stepsafe.restore(str(tmp_path / "merged"))["params"]["decoder"]["layers"]["attention"]

    from safetensors.numpy import load_file

    raw = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    merged_torch = model.merge_and_unload().model.layers
    scale = np.float32(ALPHA / R)
    for ours, theirs in (("qkv", "qkv_proj"), ("out", "o_proj")):
        for i in range(L):
            a = raw[f"base_model.model.model.layers.{i}.self_attn.{theirs}.lora_A.weight"]
            b = raw[f"base_model.model.model.layers.{i}.self_attn.{theirs}.lora_B.weight"]
            have = got[ours]["kernel"][i]
            # the same float32 arithmetic in the kernel's orientation: bit-exact
            same = w[theirs][i].T + (np.ascontiguousarray(a.T) @ np.ascontiguousarray(b.T)) * scale
            assert have.tobytes() == same.astype(np.float32).tobytes()
            # PEFT's orientation, W + B @ A * alpha / r in float64: within float32 rounding
            exact = w[theirs][i].astype(np.float64) + (b.astype(np.float64) @ a) * (ALPHA / R)
            np.testing.assert_allclose(have.T, exact, rtol=1e-6, atol=1e-6)
            # PEFT's own merge (torch float32)
            theirs_w = getattr(merged_torch[i].self_attn, theirs).weight.detach().numpy()
            np.testing.assert_allclose(have.T, theirs_w, rtol=1e-6, atol=1e-6)


def test_unmapped_tensors_are_listed(tmp_path):
    write_peft(tmp_path / "peft")

    def only_qkv(flat):
        full = from_peft({k: v for k, v in dict.items(flat) if "qkv_proj" in k})
        for k in list(dict.keys(flat)):
            if "qkv_proj" in k:
                flat[k]
        return full

    with pytest.raises(ConfigError, match=r"4 weight\(s\) .* not mapped.*o_proj"):
        import_peft(str(tmp_path / "peft"), str(tmp_path / "a"), only_qkv)
    assert not (tmp_path / "a").exists()


def test_a_function_that_wants_a_missing_tensor_is_named(tmp_path):
    write_peft(tmp_path / "peft")

    def wants(flat):
        return {"x": {"lora_a.kernel": flat["nope"], "lora_b.kernel": flat["nope"]}}

    with pytest.raises(ConfigError, match="wants weight 'nope'"):
        import_peft(str(tmp_path / "peft"), str(tmp_path / "a"), wants)


def test_bad_peft_directories_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"has no adapter_config\.json"):
        import_peft(str(tmp_path), str(tmp_path / "a"), from_peft)
    write_peft(tmp_path / "rs", use_rslora=True)
    with pytest.raises(ConfigError, match="use_rslora=True is not supported"):
        import_peft(str(tmp_path / "rs"), str(tmp_path / "a"), from_peft)
    write_peft(tmp_path / "p")
    (tmp_path / "p" / "adapter_model.safetensors").rename(tmp_path / "p" / "adapter_model.bin")
    with pytest.raises(CheckpointNotFoundError, match="is a pickle, never loaded"):
        import_peft(str(tmp_path / "p"), str(tmp_path / "a"), from_peft)
    assert not (tmp_path / "a").exists()


def test_the_demo_trainer_fine_tunes_an_imported_peft_adapter(tmp_path):
    jax = pytest.importorskip("jax")
    from stepsafe.config import load_config
    from stepsafe.demo.train import train

    write_peft(tmp_path / "peft", d=32, n=2)
    import_peft(str(tmp_path / "peft"), str(tmp_path / "ad" / "hf"), from_peft, scan_axis=0)
    _, imported = load_adapter(str(tmp_path / "ad" / "hf"))
    flags = ["steps=2", "log_period=1", "warmup_steps=1", "emb_dim=32", "mlp_dim=64",
             "max_target_length=16", "per_device_batch_size=2", "num_decoder_layers=2",
             f"base_output_directory={tmp_path}", "run_name=ft",
             f"lora_input_adapters_path={tmp_path / 'ad'}"]  # fmt: skip
    result = train(load_config(None, flags))
    trained = jax.tree.map(np.asarray, result.state["lora_params"])
    config, saved = load_adapter(str(tmp_path / "ft" / "lora" / "2" / "hf"))
    assert (config.r, config.lora_alpha) == (R, ALPHA)
    assert_bit_exact(saved, trained)
    got = trained["decoder"]["layers"]["attention"]["qkv"]["lora_b.kernel"]
    was = imported["decoder"]["layers"]["attention"]["qkv"]["lora_b.kernel"]
    assert got.shape == was.shape and not np.array_equal(got, was)


def test_the_demo_function_records_its_layer_axis(tmp_path):
    write_peft(tmp_path / "peft")
    import_peft(str(tmp_path / "peft"), str(tmp_path / "a"), from_peft)
    assert stepsafe.info(str(tmp_path / "a" / "0")).custom_metadata["lora_scan_axis"] == 0
