"""save / restore / metadata: tree + format + array adapters, for one checkpoint path."""

from stepsafe.checkpoint.inspect import ArrayMetadata, CheckpointInfo, info, metadata
from stepsafe.checkpoint.locate import committed_steps, locate, uncommitted_entries
from stepsafe.checkpoint.restore import open_checkpoint, restore
from stepsafe.checkpoint.save import Snapshot, save, snapshot, write
from stepsafe.checkpoint.verify import VerifyReport, verify

__all__ = [
    "ArrayMetadata",
    "CheckpointInfo",
    "Snapshot",
    "VerifyReport",
    "committed_steps",
    "info",
    "locate",
    "metadata",
    "open_checkpoint",
    "restore",
    "save",
    "snapshot",
    "uncommitted_entries",
    "verify",
    "write",
]
