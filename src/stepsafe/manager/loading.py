"""Which state a run starts from (MaxText's loading priority), first match wins:

1. a committed checkpoint of this run -> its full state (and data-iterator position): the
   newest step that restores; a damaged newer step is logged at ERROR and left in place;
2. ``load_parameters_path`` -> parameters only, or ``load_full_state_path`` -> a full state
   from another run (setting both is an error);
3. nothing -> the caller initialises from scratch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stepsafe.checkpoint import metadata, restore
from stepsafe.checkpoint.orbax_locate import NOT_STEPSAFE, designating_path, orbax_instead
from stepsafe.checkpoint.restore import open_checkpoint
from stepsafe.errors import ConfigError
from stepsafe.manager.iterator_state import CheckpointableIterator
from stepsafe.manager.manager import CheckpointManager

log = logging.getLogger("stepsafe")


@dataclass
class Loaded:
    """``source`` is "resume", "parameters", "full_state" or "scratch"; ``state`` what was read
    (the full state, or only the parameters for "parameters"; None for "scratch")."""

    source: str
    state: Any = None
    path: str = ""


def load_initial_state(
    manager: CheckpointManager,
    abstract_state: Any,
    *,
    load_parameters_path: str = "",
    load_full_state_path: str = "",
    data_iterator: CheckpointableIterator | None = None,
    params_key: str = "params",
    load_parameters: Callable[[str, Any], Any] | None = None,
) -> Loaded:
    """The state a run starts from, by the priority above.

    Args:
        manager (`CheckpointManager`): the run's manager (its steps come first).
        abstract_state (`Any`): the state's shapes, dtypes and shardings.
        load_parameters_path (`str`): parameters from another run's checkpoint (stepsafe's,
            or Orbax's: MaxText's, read through orbax-checkpoint).
        load_full_state_path (`str`): a whole state from another run's checkpoint (either).
        data_iterator (`CheckpointableIterator`, *optional*): restored with a resume.
        params_key (`str`): where the parameters lie in the state.
        load_parameters (`Callable[[str, Any], Any]`, *optional*): how to read the
            parameters at a path onto their target (``stepsafe.convert.load_parameters``
            also takes a checkpoint whose layers are of the other kind); None: a restore.

    Raises:
        ConfigError: both load paths.
        StepsafeError: as the restore it runs raises.
    """
    if load_parameters_path and load_full_state_path:
        raise ConfigError(
            "load_parameters_path and load_full_state_path are mutually exclusive: set one"
        )
    if manager.latest_step() is not None:
        _, state = manager.restore_newest(abstract_state, data_iterator=data_iterator)
        return Loaded("resume", state, manager.restored_path)
    if load_parameters_path:
        if load_parameters is not None:  # it finds its source itself (a model directory too)
            path = load_parameters_path
            params = load_parameters(path, abstract_state[params_key])
        else:
            path = _resolved(load_parameters_path)
            top = metadata(path)
            select = params_key if isinstance(top, dict) and params_key in top else None
            params = restore(path, abstract_state[params_key], select=select)
        log.info("Restored parameters from %s", path)
        return Loaded("parameters", params, path)
    if load_full_state_path:
        path = _resolved(load_full_state_path)
        state = restore(path, abstract_state)
        log.info("Restored full state from %s", path)
        return Loaded("full_state", state, path)
    return Loaded("scratch")


def _resolved(path: str) -> str:
    """The step directory ``path`` designates: a committed stepsafe step, or a complete Orbax
    step (MaxText's: ``restore`` reads it through orbax-checkpoint)."""
    try:
        with open_checkpoint(path) as reader:
            return reader.path
    except NOT_STEPSAFE as e:
        return designating_path(orbax_instead(str(path), e))  # <step>/<item> when needed
