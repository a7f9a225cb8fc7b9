"""MaxText-style flags: YAML file + key=value overrides, typed and validated."""

from stepsafe.config.flags import Config
from stepsafe.config.load import load_config, validate

__all__ = ["Config", "load_config", "validate"]
