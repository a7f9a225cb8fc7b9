"""stepsafe: fast, atomic, verified checkpoints for large-model training.

import stepsafe
stepsafe.save("ckpt/1000", state)               # durable and committed when it returns
state = stepsafe.restore("ckpt/1000", target)   # bit-exact, checksums verified
stepsafe.metadata("ckpt/1000")                  # shapes and dtypes, no data read
stepsafe.verify("ckpt/1000").ok                 # re-read every byte, report every problem
"""

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
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    CredentialsError,
    DeletionError,
    IncompleteCheckpointError,
    ManifestError,
    MultiProcessSaveError,
    RunInUseError,
    StepsafeError,
    StorageError,
    TargetMismatchError,
    TruncatedDataError,
    UnsupportedFormatError,
    UnsupportedLeafError,
)
from stepsafe.storage import remove_stale_temporaries, stale_temporaries

__version__ = "0.1.0"

__all__ = [
    "ArrayMetadata",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "CredentialsError",
    "DeletionError",
    "IncompleteCheckpointError",
    "ManifestError",
    "MultiProcessSaveError",
    "RunInUseError",
    "StepsafeError",
    "StorageError",
    "TargetMismatchError",
    "TruncatedDataError",
    "UnsupportedFormatError",
    "UnsupportedLeafError",
    "VerifyReport",
    "info",
    "metadata",
    "remove_stale_temporaries",
    "restore",
    "save",
    "stale_temporaries",
    "verify",
]
