"""The whole road a model travels (#15's proof): a Hugging Face Llama that transformers saved,
imported as MaxText's scanned tree, trained on (a training checkpoint with optimizer state),
cut to param-only, unstacked, exported as safetensors, imported again (stacked), sent to Orbax
and read back: every step through the command line, and the parameters at the end equal the
ones at the start, bit for bit; transformers loads the exported model as the original."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
pytest.importorskip("orbax.checkpoint")
from trees import assert_bit_exact  # noqa: E402

import stepsafe  # noqa: E402
from stepsafe.cli.main import main  # noqa: E402


def same(got, want, where="") -> None:
    """Equal trees, bit for bit (key order aside: a pytree's dict keys have no order)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for k in want:
            same(got[k], want[k], f"{where}/{k}")
    else:
        assert_bit_exact(np.asarray(got), np.asarray(want), where)


def run(*args) -> None:
    code = main(["convert", *map(str, args), "--no-progress"])
    assert code == 0, args


def test_hugging_face_to_training_to_param_only_unstacked_safetensors_orbax_and_back(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "hf"))
    fn_in = ["--conversion-fn", "stepsafe.convert.hf_llama:from_hf"]
    fn_out = ["--conversion-fn", "stepsafe.convert.hf_llama:to_hf"]

    run(tmp_path / "hf", tmp_path / "imported" / "checkpoints" / "0", "--from", "safetensors",
        *fn_in)  # fmt: skip
    params = stepsafe.restore(str(tmp_path / "imported"))["params"]
    mu = {"mu": params, "count": np.int32(7)}  # a training state: Adam's moments beside
    train = tmp_path / "train" / "checkpoints" / "700"
    stepsafe.save(str(train), {"step": 700, "params": params, "opt_state": mu})

    run(train, tmp_path / "p" / "checkpoints" / "0", "--param-only")
    run(tmp_path / "p", tmp_path / "u" / "checkpoints" / "0", "--unstack", "--scan-axis", "1")
    unstacked = stepsafe.restore(str(tmp_path / "u"))["params"]
    assert "layers_2" in unstacked["decoder"] and "layers" not in unstacked["decoder"]
    run(tmp_path / "u", tmp_path / "out", "--to", "safetensors", *fn_out,
        "--hf-config", tmp_path / "hf")  # fmt: skip
    run(tmp_path / "out", tmp_path / "again" / "checkpoints" / "0", "--from", "safetensors",
        *fn_in)  # fmt: skip
    same(stepsafe.restore(str(tmp_path / "again"))["params"], params)

    run(tmp_path / "again", tmp_path / "maxtext" / "checkpoints", "--to", "orbax")
    run(tmp_path / "maxtext" / "checkpoints" / "0", tmp_path / "back" / "checkpoints" / "0")
    same(stepsafe.restore(str(tmp_path / "back"))["params"], params)

    a = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).state_dict()
    b = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    assert list(a) == list(b)
    for name in a:
        assert np.array_equal(a[name].numpy(), b[name].numpy()), name
