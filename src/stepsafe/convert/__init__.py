"""Moving a model between kinds of checkpoints, one array at a time: param-only (inference)
checkpoints, stacked <-> unstacked layers, and the sources and targets they read and write."""

from stepsafe.convert.kinds import convert_checkpoint
from stepsafe.convert.stacking import stack_layers, unstack_layers

__all__ = ["convert_checkpoint", "stack_layers", "unstack_layers"]
