"""A training run: layout, periods, retention, async saves, loading priority, interruptions."""

from stepsafe.errors import BackgroundSaveError
from stepsafe.manager.interrupts import StopRequest
from stepsafe.manager.loading import Loaded, load_initial_state
from stepsafe.manager.manager import CheckpointManager, run_checkpoint_dir
from stepsafe.manager.options import ManagerOptions

__all__ = [
    "BackgroundSaveError",
    "CheckpointManager",
    "Loaded",
    "ManagerOptions",
    "StopRequest",
    "load_initial_state",
    "run_checkpoint_dir",
]
