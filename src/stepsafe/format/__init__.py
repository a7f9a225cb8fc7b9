"""The layout of ONE checkpoint: manifest, packed data files, checksums, commit."""

from stepsafe.format.deletion import delete_checkpoint, stray_files
from stepsafe.format.layout import COMMIT_FILE, ITEMS_DIR, CommitRecord
from stepsafe.format.manifest import FORMAT_VERSION, ArrayEntry, Manifest
from stepsafe.format.plan import HostArray
from stepsafe.format.reader import CheckpointReader
from stepsafe.format.step_files import is_committed, read_commit_record, read_extra
from stepsafe.format.writer import write_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "ITEMS_DIR",
    "COMMIT_FILE",
    "ArrayEntry",
    "CommitRecord",
    "CheckpointReader",
    "HostArray",
    "Manifest",
    "delete_checkpoint",
    "is_committed",
    "read_extra",
    "read_commit_record",
    "stray_files",
    "write_checkpoint",
]
