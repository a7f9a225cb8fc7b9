"""MaxText-style configuration: a YAML file, then ``key=value`` overrides, typed and checked.

Every flag either does what MaxText's docs say or is refused here with a message saying why; none
is accepted and silently ignored. Values in overrides are parsed as YAML scalars
(``true``, ``10``, ``1e-3``, ``null``), except for string flags, which keep the text as typed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

import yaml

from stepsafe.config.flags import Config
from stepsafe.errors import ConfigError

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)

# flag -> (value that works, why any other value is refused)
_NOT_YET = {
    "force_unroll": (
        False, "MaxText unrolls layers only when it generates a param-only checkpoint; stepsafe "
        "does that with `stepsafe convert SRC DST --param-only --unstack` (and "
        "load_parameters_path takes stacked or unstacked parameters)"
    ),
    "checkpoint_storage_use_ocdbt": (
        True, "stepsafe always packs many arrays per data file (OCDBT's purpose); it has no "
        "one-file-per-array mode"
    ),
    "checkpoint_storage_use_zarr3": (
        True, "stepsafe always writes its own chunked, checksummed format (zarr3's role); it "
        "cannot write Zarr"
    ),
    "enable_orbax_v1": (False, "stepsafe is not Orbax; there is no v1 API to switch to"),
}  # fmt: skip


def _coerce(name: str, value: Any) -> Any:
    want = _TYPES[name]
    optional = isinstance(want, types.UnionType) and type(None) in typing.get_args(want)
    base = next(t for t in typing.get_args(want) if t is not type(None)) if optional else want
    if value is None and (optional or name == "max_num_checkpoints_to_keep"):
        return None if optional else 0
    if base is bool and isinstance(value, bool):
        return value
    if base is int and type(value) is int:
        return value
    if base is float and type(value) in (int, float):
        return float(value)
    if base is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if base is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{name} must be {base.__name__}, got {value!r} ({type(value).__name__})")


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    _check_known(key, "command line")
    if _TYPES[key] is str:
        return key, raw
    try:
        return key, yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse the value ({e})") from e


def _check_known(key: str, where: str) -> None:
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, list(_FIELDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown flag {key!r} in {where}{hint}")


def load_config(
    yaml_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """The flags of a run: MaxText's names, from a YAML file, then ``key=value`` overrides.

    Args:
        yaml_path (`str`, *optional*): a YAML mapping of flag: value; None: defaults only.
        overrides (`list[str]`, defaults to `()`): ``key=value`` strings, applied in order
            after the file (the last one wins); values parse as YAML scalars, except for
            string flags, which keep the text as typed.

    Returns:
        `Config`: every flag typed and checked (see ``validate``).

    Raises:
        ConfigError: the file cannot be read or is not a YAML mapping, a flag is unknown (the
            message suggests the closest name), a value has the wrong type or is out of
            range, or a flag asks for something not built (the message says why).

    Example:

    ```python
    from stepsafe.config import load_config

    config = load_config("examples/configs/demo.yml", ["checkpoint_period=50", "run_name=try1"])
    ```
    """
    values: dict[str, Any] = {}
    if yaml_path:
        try:
            with open(yaml_path) as f:
                doc = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {yaml_path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config {yaml_path} is not valid YAML: {e}") from e
        if not isinstance(doc, dict):
            raise ConfigError(f"config {yaml_path} must be a mapping of flag: value")
        for key, value in doc.items():
            _check_known(str(key), yaml_path)
            values[str(key)] = value
    for text in overrides:
        key, value = _parse_override(text)
        values[key] = value
    config = Config(**{k: _coerce(k, v) for k, v in values.items()})
    validate(config)
    return config


def validate(config: Config) -> None:
    """Refuse a ``Config`` that cannot run as given (``load_config`` calls it).

    Args:
        config (`Config`): the flags, e.g. built directly or changed with
            ``dataclasses.replace``.

    Raises:
        ConfigError: a flag that is not supported yet set to anything but its default, both
            ``load_parameters_path`` and ``load_full_state_path``, or a value out of range;
            the message names the flag.

    Example:

    ```python
    import dataclasses
    from stepsafe.config import Config, validate

    validate(dataclasses.replace(Config(), checkpoint_period=100))
    ```
    """
    for name, (works, why) in _NOT_YET.items():
        value = getattr(config, name)
        if value != works:
            raise ConfigError(f"{name}={value!r} is not supported: {why}. Leave it at {works!r}.")
    if config.load_parameters_path and config.load_full_state_path:
        raise ConfigError(
            "load_parameters_path and load_full_state_path are mutually exclusive: set one"
        )
    positive = ["checkpoint_period", "steps", "per_device_batch_size", "max_target_length",
                "vocab_size", "emb_dim", "num_heads", "mlp_dim", "num_decoder_layers",
                "log_period", "checkpoint_storage_concurrent_gb"]  # fmt: skip
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    zero_or_more = ("max_num_checkpoints_to_keep", "warmup_steps", "wall_clock_limit_seconds",
                    "replica_axis_index")  # fmt: skip
    for name in zero_or_more:
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(config, name)}")
    _check_processes(config)
    _check_tiers(config)
    _check_source(config)
    _check_lora(config)
    size = config.checkpoint_storage_target_data_file_size_bytes
    if size is not None and size < 4096:
        raise ConfigError("checkpoint_storage_target_data_file_size_bytes must be >= 4096")
    if config.emb_dim % config.num_heads:
        raise ConfigError(f"emb_dim ({config.emb_dim}) must be divisible by num_heads")
    if not config.run_name or "/" in config.run_name or config.run_name in (".", ".."):
        raise ConfigError(
            "run_name must be a non-empty name without '/' (nor '.' or '..'), got "
            f"{config.run_name!r}"
        )


def _check_processes(config: Config) -> None:
    """The jax.distributed flags make sense together (the coordinator may still come from the
    environment, which the trainer checks when it starts)."""
    count, index = config.jax_num_processes, config.jax_process_id
    if config.jax_distributed_initialization_timeout < 1:
        raise ConfigError(
            "jax_distributed_initialization_timeout must be >= 1 second, got "
            f"{config.jax_distributed_initialization_timeout}"
        )
    if count is not None and count < 1:
        raise ConfigError(f"jax_num_processes must be >= 1, got {count}")
    if index is not None and (index < 0 or (count is not None and index >= count)):
        raise ConfigError(
            f"jax_process_id must be in [0, jax_num_processes) = [0, {count}), got {index}"
            if count is not None
            else f"jax_process_id must be >= 0, got {index}"
        )
    if (index is None) != (count is None) and count != 1:
        raise ConfigError(
            "set jax_num_processes and jax_process_id together (or neither, to let JAX detect "
            f"them on a cluster), got jax_num_processes={count}, jax_process_id={index}"
        )


def _check_tiers(config: Config) -> None:
    """The local-tier flags make sense together (MaxText's checks: a directory and a period for
    either mode, one backup interval of at least the local period for multi-tier)."""
    emergency, multi = config.enable_emergency_checkpoint, config.enable_multi_tier_checkpointing
    if emergency and multi:
        raise ConfigError(
            "enable_emergency_checkpoint and enable_multi_tier_checkpointing are two modes of "
            "the local tier: set one"
        )
    if config.local_checkpoint_max_to_keep < 1:
        raise ConfigError(
            f"local_checkpoint_max_to_keep must be >= 1, got {config.local_checkpoint_max_to_keep}"
        )
    minutes = config.multi_tier_checkpointing_backup_interval_minutes
    steps = config.multi_tier_checkpointing_backup_interval_steps
    if not (emergency or multi):
        if config.local_checkpoint_directory or config.local_checkpoint_period:
            raise ConfigError(
                "local_checkpoint_directory / local_checkpoint_period are set, but neither "
                "enable_emergency_checkpoint nor enable_multi_tier_checkpointing is true: set "
                "one to use the local tier"
            )
        if minutes is not None or steps is not None:
            raise ConfigError(
                "a multi_tier_checkpointing_backup_interval_* flag is set without "
                "enable_multi_tier_checkpointing=true"
            )
        return
    mode = "enable_emergency_checkpoint" if emergency else "enable_multi_tier_checkpointing"
    if not config.local_checkpoint_directory:
        raise ConfigError(f"{mode}=true needs local_checkpoint_directory (a disk on each host)")
    if config.local_checkpoint_period < 1:
        raise ConfigError(
            f"{mode}=true needs local_checkpoint_period >= 1, got {config.local_checkpoint_period}"
        )
    if emergency:
        if minutes is not None or steps is not None:
            raise ConfigError(
                "the multi_tier_checkpointing_backup_interval_* flags need "
                "enable_multi_tier_checkpointing=true, not enable_emergency_checkpoint"
            )
        return
    if (minutes is None) == (steps is None):
        raise ConfigError(
            "enable_multi_tier_checkpointing=true needs exactly one of "
            "multi_tier_checkpointing_backup_interval_minutes and "
            f"multi_tier_checkpointing_backup_interval_steps, got {minutes!r} and {steps!r}"
        )
    if minutes is not None and not minutes > 0:
        raise ConfigError(
            f"multi_tier_checkpointing_backup_interval_minutes must be > 0, got {minutes}"
        )
    if steps is not None and steps < config.local_checkpoint_period:
        raise ConfigError(
            f"multi_tier_checkpointing_backup_interval_steps ({steps}) must be >= "
            f"local_checkpoint_period ({config.local_checkpoint_period})"
        )


def _check_source(config: Config) -> None:
    """What ``load_parameters_path`` holds: a stepsafe checkpoint ("orbax", MaxText's name for
    its own layout), or a Hugging Face safetensors model read through a conversion function."""
    layout, fn = config.source_checkpoint_layout, config.checkpoint_conversion_fn
    if layout not in ("orbax", "safetensors"):
        raise ConfigError(
            f"source_checkpoint_layout must be 'orbax' (a checkpoint) or 'safetensors' (a "
            f"Hugging Face model directory), got {layout!r}"
        )
    if layout == "safetensors":
        if not config.load_parameters_path:
            raise ConfigError(
                "source_checkpoint_layout=safetensors reads load_parameters_path: set it to the "
                "Hugging Face model directory"
            )
        if not fn:
            raise ConfigError(
                "source_checkpoint_layout=safetensors needs checkpoint_conversion_fn (module:"
                "function, Hugging Face names -> the model's tree; the demo model's is "
                "stepsafe.convert.hf_demo:from_hf)"
            )
    elif fn:
        raise ConfigError(
            "checkpoint_conversion_fn applies to source_checkpoint_layout=safetensors only; "
            "a checkpoint's parameters load as they are (stacked or unstacked)"
        )


def _check_lora(config: Config) -> None:
    """The LoRA flags make sense together (which adapter, and its rank, are checked against
    the directory when the trainer starts)."""
    if config.lora_rank < 0 or not 0 <= config.lora_alpha < float("inf"):  # NaN is refused
        raise ConfigError(
            f"lora_rank and lora_alpha must be >= 0 and finite (0: the adapter's own), got "
            f"{config.lora_rank} and {config.lora_alpha}"
        )
    if not config.lora_input_adapters_path:
        for name, unset in (("lora_id", ""), ("lora_rank", 0), ("lora_alpha", 0.0)):
            if getattr(config, name) != unset:
                raise ConfigError(
                    f"{name} is set, but lora_input_adapters_path is not: set it to the "
                    "LoRA adapters' directory (<lora_id>/adapter_config.json)"
                )
        return
    lora_id = config.lora_id
    if lora_id and ("/" in lora_id or lora_id in (".", "..")):
        raise ConfigError(f"lora_id must be a directory name without '/', got {lora_id!r}")
    if config.load_full_state_path:
        raise ConfigError(
            "lora_input_adapters_path and load_full_state_path cannot be combined: a full state "
            "brings its own parameters; load the base with load_parameters_path"
        )
