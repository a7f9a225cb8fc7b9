"""Moving a model between kinds of checkpoints, one array at a time: param-only (inference)
checkpoints, stacked <-> unstacked layers, LoRA adapters (MaxText's layout, merged into base
weights, imported from PEFT), and the sources and targets they read and write."""

from stepsafe.convert.kinds import Converted, convert_checkpoint
from stepsafe.convert.lora import (
    AdapterConfig,
    list_adapters,
    load_adapter,
    load_adapters,
    save_adapter,
)
from stepsafe.convert.lora_merge import Merged, merge_lora
from stepsafe.convert.params_loading import load_parameters
from stepsafe.convert.peft import import_peft
from stepsafe.convert.stacking import stack_layers, unstack_layers

__all__ = [
    "AdapterConfig",
    "Converted",
    "Merged",
    "convert_checkpoint",
    "import_peft",
    "list_adapters",
    "load_adapter",
    "load_adapters",
    "load_parameters",
    "merge_lora",
    "save_adapter",
    "stack_layers",
    "unstack_layers",
]
