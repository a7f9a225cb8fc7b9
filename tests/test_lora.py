"""LoRA adapters in MaxText's layout: saved and loaded bit-exact, merged into base weights as
W + A·B·alpha/r one array at a time, and every bad adapter refused with a clear error."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from trees import assert_bit_exact

import stepsafe
from stepsafe.convert import AdapterConfig, list_adapters, load_adapter, merge_lora, save_adapter
from stepsafe.convert.lora_merge import merged_kernel
from stepsafe.errors import CheckpointExistsError, ConfigError, TargetMismatchError

L, D, R, ALPHA = 3, 8, 4, 12.0
rng = np.random.default_rng()


def demo_adapter(r: int = R) -> dict:
    """The demo model's adapter tree: stacked along axis 0, A [L, in, r], B [L, r, out]."""
    f32 = np.float32
    return {
        "decoder": {
            "layers": {
                "attention": {
                    "qkv": {
                        "lora_a.kernel": rng.standard_normal((L, D, r)).astype(f32),
                        "lora_b.kernel": rng.standard_normal((L, r, 3 * D)).astype(f32),
                    },
                    "out": {
                        "lora_a.kernel": rng.standard_normal((L, D, r)).astype(f32),
                        "lora_b.kernel": rng.standard_normal((L, r, D)).astype(f32),
                    },
                }
            }
        }
    }


def demo_base(dtype=np.float32) -> dict:
    return {
        "token_embedder": {"embedding": rng.standard_normal((16, D)).astype(dtype)},
        "decoder": {
            "layers": {
                "attention": {
                    "qkv": {"kernel": rng.standard_normal((L, D, 3 * D)).astype(dtype)},
                    "out": {"kernel": rng.standard_normal((L, D, D)).astype(dtype)},
                },
                "mlp": {"wi": {"kernel": rng.standard_normal((L, D, 2 * D)).astype(dtype)}},
            }
        },
    }


CONFIG = AdapterConfig(R, ALPHA, ("qkv_proj", "o_proj"), {"peft_type": "LORA", "note": "kept"})


def test_save_then_load_is_bit_exact_in_maxtexts_layout(tmp_path):
    params = demo_adapter()
    save_adapter(str(tmp_path / "adapters" / "a1"), params, CONFIG, scan_axis=0)
    root = tmp_path / "adapters" / "a1"
    assert (root / "0" / "items").is_dir() and (root / "0" / "_CHECKPOINT_METADATA").is_file()
    doc = json.loads((root / "adapter_config.json").read_text())
    assert doc == {"r": R, "lora_alpha": ALPHA, "target_modules": ["qkv_proj", "o_proj"],
                   "peft_type": "LORA", "note": "kept"}  # fmt: skip
    assert list_adapters(str(tmp_path / "adapters")) == ["a1"]
    config, got = load_adapter(str(root))
    assert config == CONFIG
    assert_bit_exact(got, params)
    assert stepsafe.info(str(root / "0")).custom_metadata["lora_scan_axis"] == 0


def test_bfloat16_adapter_round_trips(tmp_path):
    params = demo_adapter()
    params = {"decoder": {"layers": {"attention": {"out": {
        k: v.astype(ml_dtypes.bfloat16)
        for k, v in params["decoder"]["layers"]["attention"]["out"].items()}}}}}  # fmt: skip
    save_adapter(str(tmp_path / "b"), params, CONFIG)
    assert_bit_exact(load_adapter(str(tmp_path / "b"))[1], params)


def test_an_adapter_is_never_overwritten(tmp_path):
    save_adapter(str(tmp_path / "a"), demo_adapter(), CONFIG)
    before = (tmp_path / "a" / "adapter_config.json").read_bytes()
    with pytest.raises(CheckpointExistsError, match="holds an adapter already"):
        save_adapter(str(tmp_path / "a"), demo_adapter(), CONFIG)
    assert (tmp_path / "a" / "adapter_config.json").read_bytes() == before


def test_missing_config_bad_config_and_rank_mismatch_are_refused(tmp_path):
    save_adapter(str(tmp_path / "a"), demo_adapter(), CONFIG)
    config_file = tmp_path / "a" / "adapter_config.json"
    doc = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**doc, "r": 3}))
    with pytest.raises(ConfigError, match=r"not of rank r=3"):
        load_adapter(str(tmp_path / "a"))
    config_file.write_text(json.dumps({**doc, "use_rslora": True}))
    with pytest.raises(ConfigError, match="use_rslora=True is not supported"):
        load_adapter(str(tmp_path / "a"))
    config_file.write_text(json.dumps({**doc, "target_modules": "q_proj|v_proj"}))
    with pytest.raises(ConfigError, match="target_modules must be a non-empty list"):
        load_adapter(str(tmp_path / "a"))
    config_file.unlink()
    with pytest.raises(ConfigError, match=r"has no adapter_config\.json"):
        load_adapter(str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="must be an integer >= 1"):
        save_adapter(str(tmp_path / "c"), demo_adapter(), AdapterConfig(0, 1.0, ("x",)))
    with pytest.raises(ConfigError, match="not of rank r=5"):
        save_adapter(str(tmp_path / "c"), demo_adapter(), AdapterConfig(5, 1.0, ("x",)))
    assert not (tmp_path / "c").exists()


def test_load_onto_a_target_of_other_shapes_is_refused(tmp_path):
    save_adapter(str(tmp_path / "a"), demo_adapter(), CONFIG)
    target = demo_adapter(r=2)
    with pytest.raises(TargetMismatchError):
        load_adapter(str(tmp_path / "a"), target)


def expected(w: np.ndarray, a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    """Independently: per layer, W + (A @ B) * alpha/r in float32 (the same arithmetic)."""
    out = w.astype(np.float32).copy()
    for i in range(w.shape[axis]):
        at = (slice(None),) * axis + (i,)
        al, bl = a[at].astype(np.float32), b[at].astype(np.float32)
        out[at] = out[at] + (al.reshape(-1, R) @ bl.reshape(R, -1)).reshape(out[at].shape) * (
            np.float32(ALPHA / R)
        )
    return out.astype(w.dtype)


def test_merge_into_a_checkpoint_equals_numpy(tmp_path):
    base, adapter = demo_base(), demo_adapter()
    stepsafe.save(str(tmp_path / "base" / "7"), {"step": 7, "params": base})
    save_adapter(str(tmp_path / "ad" / "x"), adapter, CONFIG, scan_axis=0)
    got = merge_lora(str(tmp_path / "base" / "7"), str(tmp_path / "ad" / "x"), str(tmp_path / "m"))
    assert got.step == stepsafe.info(str(tmp_path / "base" / "7")).step and sorted(got.modules) == [
        "decoder/layers/attention/out", "decoder/layers/attention/qkv"]  # fmt: skip
    merged = stepsafe.restore(str(tmp_path / "m"))
    assert merged["step"] == 7
    for name in ("qkv", "out"):
        w = base["decoder"]["layers"]["attention"][name]["kernel"]
        pair = adapter["decoder"]["layers"]["attention"][name]
        want = expected(w, pair["lora_a.kernel"], pair["lora_b.kernel"], 0)
        have = merged["params"]["decoder"]["layers"]["attention"][name]["kernel"]
        assert have.tobytes() == want.tobytes()  # bit-exact: the same float32 arithmetic
        delta = np.einsum("lir,lro->lio", pair["lora_a.kernel"].astype(np.float64),
                          pair["lora_b.kernel"].astype(np.float64))  # fmt: skip
        np.testing.assert_allclose(have, w + delta * ALPHA / R, rtol=1e-5, atol=1e-5)
    for path in (("token_embedder", "embedding"), ("decoder", "layers", "mlp", "wi", "kernel")):
        a, b = base, merged["params"]
        for k in path:
            a, b = a[k], b[k]
        assert_bit_exact(b, a)


def test_merge_param_only_of_a_bfloat16_base(tmp_path):
    base, adapter = demo_base(ml_dtypes.bfloat16), demo_adapter()
    stepsafe.save(str(tmp_path / "b"), {"params": base, "opt_state": {"mu": np.ones(3)}})
    save_adapter(str(tmp_path / "x"), adapter, CONFIG, scan_axis=0)
    merge_lora(str(tmp_path / "b"), str(tmp_path / "x"), str(tmp_path / "m"), param_only=True)
    merged = stepsafe.restore(str(tmp_path / "m"))
    assert list(merged) == ["params"] and stepsafe.info(str(tmp_path / "m")).step == 0
    w = base["decoder"]["layers"]["attention"]["out"]["kernel"]
    pair = adapter["decoder"]["layers"]["attention"]["out"]
    have = merged["params"]["decoder"]["layers"]["attention"]["out"]["kernel"]
    assert have.dtype == ml_dtypes.bfloat16
    assert have.tobytes() == expected(w, pair["lora_a.kernel"], pair["lora_b.kernel"], 0).tobytes()


def test_merged_kernel_takes_maxtexts_shapes_stacked_on_axis_1():
    """MaxText's query kernel [emb, L, heads, head_dim]: A [emb, L, r], B [r, L, heads, hd]."""
    w = rng.standard_normal((D, L, 2, 3)).astype(np.float32)
    a = rng.standard_normal((D, L, R)).astype(np.float32)
    b = rng.standard_normal((R, L, 2, 3)).astype(np.float32)
    got = merged_kernel(w.copy(), a, b, ALPHA / R, 1)
    delta = np.einsum("elr,rlhd->elhd", a.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(got, w + delta * ALPHA / R, rtol=1e-5, atol=1e-5)


def test_merge_refuses_wrong_axis_foreign_modules_and_existing_output(tmp_path):
    base, adapter = demo_base(), demo_adapter()
    stepsafe.save(str(tmp_path / "b"), {"params": base})
    save_adapter(str(tmp_path / "x"), adapter, CONFIG)  # no recorded axis: MaxText's 1
    with pytest.raises(ConfigError, match="is that the model's layer axis"):
        merge_lora(str(tmp_path / "b"), str(tmp_path / "x"), str(tmp_path / "m"))
    save_adapter(str(tmp_path / "y"), adapter, CONFIG, scan_axis=0)
    with pytest.raises(ConfigError, match="saved with its layers along axis 0"):
        merge_lora(str(tmp_path / "b"), str(tmp_path / "y"), str(tmp_path / "m"), scan_axis=1)
    other = {"encoder": adapter["decoder"]}
    save_adapter(str(tmp_path / "z"), other, CONFIG, scan_axis=0)
    with pytest.raises(ConfigError, match="which the base params lack"):
        merge_lora(str(tmp_path / "b"), str(tmp_path / "z"), str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()
    merge_lora(str(tmp_path / "b"), str(tmp_path / "y"), str(tmp_path / "m"))
    with pytest.raises(CheckpointExistsError):
        merge_lora(str(tmp_path / "b"), str(tmp_path / "y"), str(tmp_path / "m"))


def test_maxtexts_none_leaves_are_passed_by(tmp_path):
    adapter = demo_adapter()
    adapter["token_embedder"] = {"embedding": None}
    adapter["decoder"]["layers"]["mlp"] = {"wi": {"kernel": None}}
    save_adapter(str(tmp_path / "a"), adapter, CONFIG)
    assert_bit_exact(load_adapter(str(tmp_path / "a"))[1], adapter)
    adapter["decoder"]["layers"]["mlp"]["wi"]["kernel"] = np.ones(3, np.float32)
    with pytest.raises(Exception, match="is not a LoRA weight"):
        save_adapter(str(tmp_path / "b"), adapter, CONFIG)


def test_every_adapter_of_a_parent_loads(tmp_path):
    from stepsafe.convert import load_adapters

    one, two = demo_adapter(), demo_adapter()
    save_adapter(str(tmp_path / "p" / "one"), one, CONFIG)
    save_adapter(str(tmp_path / "p" / "two"), two, CONFIG)
    (tmp_path / "p" / "notes").mkdir()  # no adapter_config.json: not an adapter
    got = load_adapters(str(tmp_path / "p"))
    assert list(got) == ["one", "two"]
    assert_bit_exact(got["one"][1], one)
    assert_bit_exact(got["two"][1], two)
