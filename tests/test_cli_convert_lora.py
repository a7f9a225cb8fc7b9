"""``stepsafe convert`` for LoRA adapters and Hugging Face configs, end to end through the CLI:
``--from peft`` imports an adapter peft itself wrote, ``--merge-lora`` merges it into a
checkpoint (the same bytes as the library's merge), ``--hf-config`` writes a model's config
beside its weights; flags a conversion would not read are refused, naming who reads them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("peft")
from test_lora import demo_base
from test_peft import write_peft
from trees import assert_bit_exact

import stepsafe
from stepsafe.cli.main import main
from stepsafe.convert import load_adapter, merge_lora


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_peft_import_and_merge_through_the_cli(tmp_path, capsys):
    write_peft(tmp_path / "peft", n=3)
    code, out, err = cli(
        capsys, "convert", tmp_path / "peft", tmp_path / "adapters" / "hf", "--from", "peft",
        "--conversion-fn", "stepsafe.convert.peft_demo:from_peft", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "LoRA adapter, r=4, lora_alpha=12" in out
    config, _ = load_adapter(str(tmp_path / "adapters" / "hf"))
    assert (config.r, config.lora_alpha) == (4, 12)

    stepsafe.save(str(tmp_path / "base" / "checkpoints" / "5"), {"step": 5, "params": demo_base()})
    code, out, err = cli(
        capsys, "convert", tmp_path / "base", tmp_path / "merged" / "checkpoints" / "0",
        "--merge-lora", tmp_path / "adapters" / "hf", "--param-only", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "2 module(s) merged" in out
    merge_lora(
        str(tmp_path / "base"), str(tmp_path / "adapters" / "hf"), str(tmp_path / "lib"),
        param_only=True,
    )  # fmt: skip
    assert_bit_exact(
        stepsafe.restore(str(tmp_path / "merged")), stepsafe.restore(str(tmp_path / "lib"))
    )


@pytest.mark.parametrize(
    "args, flag, reader",
    [
        (["--merge-lora", "x", "--dtype", "bfloat16"], "--dtype", "a conversion between"),
        (["--from", "peft", "--max-shard-bytes", "9"], "--max-shard-bytes", "--to safetensors"),
        (["--hf-config", "c.json"], "--hf-config", "--to safetensors"),
        (["--to", "orbax", "--hf-config", "c.json"], "--hf-config", "--to safetensors"),
        (["--from", "safetensors", "--conversion-fn", "a:b", "--step", "3"], "--step", "orbax"),
    ],
)
def test_flags_a_conversion_would_not_read_are_refused(tmp_path, capsys, args, flag, reader):
    code, _, err = cli(capsys, "convert", tmp_path / "src", tmp_path / "dst", *args)
    assert code == 2 and f"{flag} not read by this conversion" in err and reader in err
    assert not (tmp_path / "dst").exists()


def test_merge_lora_and_to_are_one_choice(tmp_path, capsys):
    code, _, err = cli(capsys, "convert", "a", "b", "--merge-lora", "x", "--to", "orbax")
    assert code == 2 and "not allowed with argument --merge-lora" in err


def test_hf_config_is_written_beside_the_weights(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "hf"))
    fn = ["--conversion-fn", "stepsafe.convert.hf_llama:from_hf"]
    code, _, err = cli(capsys, "convert", tmp_path / "hf", tmp_path / "mt" / "checkpoints" / "0",
                       "--from", "safetensors", *fn, "--no-progress")  # fmt: skip
    assert code == 0, err
    out_fn = ["--conversion-fn", "stepsafe.convert.hf_llama:to_hf"]
    code, _, err = cli(capsys, "convert", tmp_path / "mt", tmp_path / "back", "--to",
                         "safetensors", *out_fn, "--hf-config", tmp_path / "hf" / "config.json",
                         "--no-progress")  # fmt: skip
    assert code == 0, err
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["rms_norm_eps"] == 1e-5 and written["num_key_value_heads"] == 2
    back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "back"))
    orig = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    for (n, a), (m, b) in zip(orig.state_dict().items(), back.state_dict().items()):
        assert n == m and np.array_equal(a.numpy(), b.numpy()), n
