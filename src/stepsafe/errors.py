"""Every failure stepsafe reports on purpose is a ``StepsafeError``.

Each message names the thing that is wrong (a path, a key, a file and offset) and, where
there is one, what to do about it, so that a user reading a log line at 3 a.m. can act on it.
"""

from __future__ import annotations


class StepsafeError(Exception):
    """Base class: catch this to handle any expected stepsafe failure."""


class CheckpointNotFoundError(StepsafeError, FileNotFoundError):
    """The path holds no checkpoint at all."""


class IncompleteCheckpointError(StepsafeError):
    """The checkpoint was never committed (a save died or is still running)."""


class CheckpointExistsError(StepsafeError, FileExistsError):
    """A committed checkpoint already lives where a save wanted to write."""


class CorruptCheckpointError(StepsafeError):
    """Bytes on storage are not what the checkpoint says they should be."""


class ChecksumMismatchError(CorruptCheckpointError):
    """A chunk's checksum does not match the bytes read back."""


class TruncatedDataError(CorruptCheckpointError):
    """A data file is shorter than the manifest says, or missing."""


class ManifestError(CorruptCheckpointError):
    """The manifest cannot be parsed, or describes something impossible or unsafe."""


class UnsupportedFormatError(StepsafeError):
    """The checkpoint was written by a newer (or foreign) format version."""


class DeletionError(StepsafeError):
    """A checkpoint (or a file in one) was not deleted: the storage refused (read-only, no
    permission), or deleting it would have reached outside the run (a symbolic link)."""


class UnsupportedLeafError(StepsafeError, TypeError):
    """A leaf (or dict key) of the tree cannot be saved."""


class TargetMismatchError(StepsafeError, ValueError):
    """The restore target's structure, shapes or dtypes do not fit the checkpoint."""


class ConfigError(StepsafeError, ValueError):
    """A configuration that cannot be run as given (unknown flag, bad value, conflict)."""


class StorageError(StepsafeError, OSError):
    """Storage refused an operation (disk full, file too large, read-only, no permission);
    the message names the path, and ``errno`` is the system's error number."""


class CredentialsError(StepsafeError):
    """A bucket URL, and no credentials for it: the message names what to set."""


class RunInUseError(StepsafeError):
    """Another manager holds (or has taken over) the run directory's lease."""


class CoordinationError(StepsafeError):
    """Processes of a jax.distributed job did not meet in time (one is slow, failed or gone)."""


class BackgroundSaveError(StepsafeError):
    """A background save (``CheckpointManager`` with ``async_save``) failed; the checkpoint it
    was writing was not committed. The original failure is its ``__cause__``."""
