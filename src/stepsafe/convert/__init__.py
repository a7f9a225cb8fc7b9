"""Moving a model between kinds of checkpoints, one array at a time: param-only (inference)
checkpoints, stacked <-> unstacked layers, and the sources and targets they read and write."""

from stepsafe.convert.kinds import Converted, convert_checkpoint
from stepsafe.convert.params_loading import load_parameters
from stepsafe.convert.stacking import stack_layers, unstack_layers

__all__ = [
    "Converted",
    "convert_checkpoint",
    "load_parameters",
    "stack_layers",
    "unstack_layers",
]
