"""MaxText-style flags: YAML + key=value, typed, validated, nothing silently ignored."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stepsafe.config import Config, load_config
from stepsafe.errors import ConfigError

DESIGN_FLAGS = """base_output_directory run_name enable_checkpointing async_checkpointing
checkpoint_period save_checkpoint_on_completion max_num_checkpoints_to_keep load_parameters_path
load_full_state_path enable_single_replica_ckpt_restoring lora_input_adapters_path force_unroll
checkpoint_storage_target_data_file_size_bytes checkpoint_storage_use_ocdbt
checkpoint_storage_use_zarr3 checkpoint_storage_concurrent_gb source_checkpoint_layout
checkpoint_conversion_fn enable_emergency_checkpoint local_checkpoint_directory
local_checkpoint_period enable_multi_tier_checkpointing""".split()


def test_every_design_flag_is_known_with_the_seeds_defaults():
    c = Config()
    for flag in DESIGN_FLAGS:
        assert hasattr(c, flag), flag
    assert c.async_checkpointing is True and c.checkpoint_period == 10000
    assert c.checkpoint_storage_target_data_file_size_bytes is None  # the storage's choice
    assert c.checkpoint_storage_concurrent_gb == 96 and c.source_checkpoint_layout == "orbax"


def test_yaml_then_overrides_typed(tmp_path: Path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("run_name: exp\ncheckpoint_period: 5\nasync_checkpointing: true\n")
    c = load_config(
        str(cfg),
        ["checkpoint_period=7", "async_checkpointing=false", "run_name=001", "learning_rate=1e-3",
         "max_num_checkpoints_to_keep=null"],
    )  # fmt: skip
    assert c.checkpoint_period == 7 and c.async_checkpointing is False
    assert c.run_name == "001" and c.learning_rate == 1e-3 and c.max_num_checkpoints_to_keep == 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("checkpoint_perid=5", "did you mean 'checkpoint_period'"),
        ("checkpoint_period=five", "checkpoint_period must be int"),
        ("checkpoint_period=0", "checkpoint_period must be >= 1"),
        ("enable_checkpointing=maybe", "enable_checkpointing must be bool"),
        ("async_checkpointing", "not key=value"),
        ("enable_emergency_checkpoint=true", "needs local_checkpoint_directory"),
        ("enable_multi_tier_checkpointing=true", "needs local_checkpoint_directory"),
        ("local_checkpoint_period=100", "neither enable_emergency_checkpoint"),
        ("local_checkpoint_max_to_keep=0", "local_checkpoint_max_to_keep must be >= 1"),
        ("multi_tier_checkpointing_backup_interval_steps=5", "without enable_multi_tier"),
        ("source_checkpoint_layout=safetensors", "reads load_parameters_path"),
        ("source_checkpoint_layout=npz", "must be 'orbax'"),
        ("checkpoint_conversion_fn=a:b", "applies to source_checkpoint_layout=safetensors"),
        ("checkpoint_storage_use_ocdbt=false", "packs"),
        ("checkpoint_storage_use_zarr3=false", "cannot write Zarr"),
        ("lora_rank=4", "LoRA"),
        ("force_unroll=true", "stepsafe convert SRC DST --param-only --unstack"),
        ("run_name=a/b", "run_name"),
        ("checkpoint_storage_concurrent_gb=0", "checkpoint_storage_concurrent_gb must be >= 1"),
    ],
)
def test_bad_or_unsupported_values_are_refused_with_a_reason(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_single_replica_restoring_is_accepted():
    c = load_config(None, ["enable_single_replica_ckpt_restoring=true", "replica_axis_index=1"])
    assert c.enable_single_replica_ckpt_restoring and c.replica_axis_index == 1
    with pytest.raises(ConfigError, match="replica_axis_index must be >= 0"):
        load_config(None, ["replica_axis_index=-1"])


def test_both_load_paths_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="mutually exclusive"):
        load_config(None, [f"load_parameters_path={tmp_path}", f"load_full_state_path={tmp_path}"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("enable_checkpoints: true\n")
    with pytest.raises(ConfigError, match=r"c\.yml.*enable_checkpointing"):
        load_config(str(cfg))


def test_demo_config_loads():
    root = Path(__file__).resolve().parents[1]
    c = load_config(str(root / "examples/configs/demo.yml"))
    assert c.enable_checkpointing and c.checkpoint_period > 0


def test_local_tier_flags_follow_maxtexts_checks():
    local = ["local_checkpoint_directory=/tmp/x", "local_checkpoint_period=10"]
    c = load_config(None, ["enable_emergency_checkpoint=true", *local])
    assert c.local_checkpoint_period == 10 and c.local_checkpoint_max_to_keep == 2
    multi = ["enable_multi_tier_checkpointing=true", *local]
    c = load_config(None, [*multi, "multi_tier_checkpointing_backup_interval_steps=20"])
    assert c.multi_tier_checkpointing_backup_interval_steps == 20
    c = load_config(None, [*multi, "multi_tier_checkpointing_backup_interval_minutes=0.5"])
    assert c.multi_tier_checkpointing_backup_interval_minutes == 0.5
    for extra, message in [
        ([], "exactly one of"),
        (["multi_tier_checkpointing_backup_interval_steps=5"], "must be >= local_checkpoint_"),
        (["multi_tier_checkpointing_backup_interval_minutes=0"], "must be > 0"),
        (["enable_emergency_checkpoint=true", "multi_tier_checkpointing_backup_interval_steps=20"],
         "set one"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [*multi, *extra])
    with pytest.raises(ConfigError, match="local_checkpoint_period >= 1"):
        load_config(None, ["enable_emergency_checkpoint=true", "local_checkpoint_directory=/x"])
