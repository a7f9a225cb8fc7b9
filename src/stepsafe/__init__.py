"""stepsafe: fast, atomic, verified checkpoints for large-model training.

import stepsafe
stepsafe.save("ckpt/1000", state)               # durable and committed when it returns
state = stepsafe.restore("ckpt/1000", target)   # bit-exact, checksums verified
stepsafe.metadata("ckpt/1000")                  # shapes and dtypes, no data read
stepsafe.verify("ckpt/1000").ok                 # re-read every byte, report every problem

with stepsafe.CheckpointManager("outputs/run1/checkpoints",
                                stepsafe.ManagerOptions(save_interval_steps=100)) as manager:
    manager.save(step, state)                   # a training run: periods, async, retention

Every failure stepsafe reports on purpose is a ``stepsafe.StepsafeError``; each subclass is
exported here.
"""

from stepsafe.arrays.single_replica import SingleReplica
from stepsafe.checkpoint import (
    ArrayMetadata,
    CheckpointInfo,
    VerifyReport,
    info,
    metadata,
    restore,
    save,
    verify,
)
from stepsafe.errors import (
    BackgroundSaveError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    ConfigError,
    CoordinationError,
    CorruptCheckpointError,
    CredentialsError,
    DeletionError,
    IncompleteCheckpointError,
    ManifestError,
    RunInUseError,
    StepsafeError,
    StorageError,
    TargetMismatchError,
    TruncatedDataError,
    UnsupportedFormatError,
    UnsupportedLeafError,
)
from stepsafe.manager import CheckpointManager, ManagerOptions, StopRequest

__version__ = "0.1.0"

__all__ = [
    "ArrayMetadata",
    "BackgroundSaveError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "ConfigError",
    "CoordinationError",
    "CorruptCheckpointError",
    "CredentialsError",
    "DeletionError",
    "IncompleteCheckpointError",
    "ManagerOptions",
    "ManifestError",
    "RunInUseError",
    "SingleReplica",
    "StepsafeError",
    "StopRequest",
    "StorageError",
    "TargetMismatchError",
    "TruncatedDataError",
    "UnsupportedFormatError",
    "UnsupportedLeafError",
    "VerifyReport",
    "info",
    "metadata",
    "restore",
    "save",
    "verify",
]
