"""The demo trainer with a LoRA adapter (lora_input_adapters_path): only the adapter trains, the
base stays bit-identical, the adapter is saved in MaxText's layout and loads back, a resume
from a checkpoint of the run is exact, and bad adapters are refused before anything runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from trees import assert_bit_exact  # noqa: E402

import stepsafe  # noqa: E402
from stepsafe.config import load_config  # noqa: E402
from stepsafe.convert import AdapterConfig, load_adapter, save_adapter  # noqa: E402
from stepsafe.errors import ConfigError  # noqa: E402

FLAGS = [
    "steps=6", "checkpoint_period=3", "log_period=1", "warmup_steps=1", "emb_dim=32",
    "mlp_dim=64", "max_target_length=16", "per_device_batch_size=2", "num_decoder_layers=2",
    "async_checkpointing=false",
]  # fmt: skip


def config(tmp_path, run: str, *extra: str):
    return load_config(None, [*FLAGS, f"base_output_directory={tmp_path}", f"run_name={run}",
                              *extra])  # fmt: skip


def host(tree):
    return jax.tree.map(np.asarray, tree)


def test_only_the_adapter_trains_and_is_saved_in_maxtexts_layout(tmp_path):
    from stepsafe.demo.lora import init_adapter, plan_lora
    from stepsafe.demo.model import init_params
    from stepsafe.demo.train import train

    (tmp_path / "adapters").mkdir()
    c = config(
        tmp_path, "r", f"lora_input_adapters_path={tmp_path / 'adapters'}", "lora_rank=4",
        "lora_alpha=8", f"load_parameters_path={tmp_path / 'base'}",
    )  # fmt: skip
    key = jax.random.key(0)  # the run's default key
    base = host(init_params(c, key))
    stepsafe.save(str(tmp_path / "base"), {"params": base})
    result = train(c)
    assert result.end_step == 6 and result.source == "parameters"
    assert_bit_exact(host(result.state["params"]), base)  # the base never moved
    lora = host(result.state["lora_params"])
    first = host(init_adapter(plan_lora(c), base, jax.random.fold_in(key, 1)))
    for name in ("qkv", "out"):
        got, was = lora["decoder"]["layers"]["attention"][name], first["decoder"]["layers"][
            "attention"][name]  # fmt: skip
        assert not np.any(was["lora_b.kernel"]) and np.any(got["lora_b.kernel"])  # B starts at 0
        assert not np.array_equal(got["lora_a.kernel"], was["lora_a.kernel"])
    # the optimizer's state covers the adapter only
    mu = result.state["opt_state"][0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(result.state["lora_params"])
    saved = tmp_path / "r" / "lora" / "6" / "default"
    assert (saved / "0" / "items").is_dir()
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 4
    adapter_config, params = load_adapter(str(saved))
    assert (adapter_config.r, adapter_config.lora_alpha) == (4, 8.0)
    assert_bit_exact(params, lora)

    # go on from the saved adapter: <run>/lora/<step> is a lora_input_adapters_path
    run = tmp_path / "r"
    c2 = config(
        tmp_path, "r2", f"lora_input_adapters_path={run / 'lora' / '6'}",
        f"load_parameters_path={run / 'checkpoints' / '6'}", "steps=1",
    )  # fmt: skip
    again = train(c2)
    assert again.source == "parameters"
    assert_bit_exact(host(again.state["params"]), base)
    assert (tmp_path / "r2" / "lora" / "1" / "default" / "adapter_config.json").is_file()


def test_resume_from_a_checkpoint_of_the_run_is_exact(tmp_path):
    from stepsafe.demo.train import train

    (tmp_path / "ad").mkdir()
    flags = (f"lora_input_adapters_path={tmp_path / 'ad'}", "lora_rank=2")
    train(config(tmp_path, "a", *flags))
    # a run that stopped at step 3: its checkpoint, and nothing after it
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "3", tmp_path / "b" / "checkpoints" / "3")
    resumed = train(config(tmp_path, "b", *flags))
    assert resumed.source == "resume" and resumed.start_step == 3
    want = stepsafe.restore(str(tmp_path / "a" / "checkpoints" / "6"))
    assert_bit_exact(stepsafe.restore(str(tmp_path / "b" / "checkpoints" / "6")), want)
    assert_bit_exact(
        load_adapter(str(tmp_path / "b" / "lora" / "6" / "default"))[1],
        load_adapter(str(tmp_path / "a" / "lora" / "6" / "default"))[1],
    )


def a_saved_adapter(directory, r=4, targets=("qkv_proj", "o_proj")):
    f32 = np.float32
    pair = {"lora_a.kernel": np.ones((2, 32, r), f32), "lora_b.kernel": np.ones((2, r, 96), f32)}
    params = {"decoder": {"layers": {"attention": {"qkv": pair}}}}
    save_adapter(str(directory), params, AdapterConfig(r, 8.0, targets))


@pytest.mark.parametrize(
    "setup, extra, message",
    [
        (None, (), "does not exist"),
        ("bare", (), "has no adapter_config.json"),
        ("empty", (), "set lora_rank"),
        ("one", ("lora_rank=8",), "lora_rank=8, but the adapter"),
        ("one", ("lora_alpha=2",), "lora_alpha=2.0, but the adapter"),
        ("foreign", (), "target module 'q_proj' is not in the demo model"),
        ("two", (), "holds 2 adapters (a, b): set lora_id"),
        ("self", (), "is an adapter itself"),
    ],
)
def test_bad_adapters_are_refused_before_training(tmp_path, setup, extra, message):
    from stepsafe.demo.lora import plan_lora

    parent = tmp_path / "ad"
    if setup is not None:
        parent.mkdir()
    if setup == "bare":
        (parent / "x" / "0").mkdir(parents=True)
    if setup in ("one", "two"):
        a_saved_adapter(parent / "a")
    if setup == "two":
        a_saved_adapter(parent / "b")
    if setup == "foreign":
        a_saved_adapter(parent / "a", targets=("q_proj",))
    if setup == "self":
        a_saved_adapter(parent / "a")
        parent = parent / "a"
    c = config(tmp_path, "r", f"lora_input_adapters_path={parent}", *extra)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_lora(c)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora_rank=4"], "lora_input_adapters_path is not"),
        (["lora_id=x"], "lora_input_adapters_path is not"),
        (["lora_input_adapters_path=ad", "lora_rank=-1"], "must be >= 0"),
        (["lora_input_adapters_path=ad", "lora_id=a/b"], "without '/'"),
        (["lora_input_adapters_path=ad", "load_full_state_path=x"], "cannot be combined"),
    ],
)
def test_lora_flags_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
