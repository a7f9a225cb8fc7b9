"""Recognise a step directory that Orbax wrote, without reading any of its arrays.

Orbax and stepsafe share the ``_CHECKPOINT_METADATA`` name (stepsafe writes Orbax's keys too), so
that file alone does not say whose a step is: stepsafe's carries ``"format": "stepsafe"``.
Orbax's item directories (``default/``, ``state/``, MaxText's ``items/``) hold ``_METADATA``, and
with OCDBT a ``manifest.ocdbt``, ``d/`` and ``ocdbt.process_<n>/``. Listing and deleting code
uses this to leave such steps alone; converting code to know what it can import.
"""

from __future__ import annotations

import json
import re
from typing import Any

from stepsafe.errors import StepsafeError
from stepsafe.format.layout import COMMIT_FILE
from stepsafe.format.manifest import FORMAT
from stepsafe.storage import Storage

ORBAX_METADATA_KEYS = frozenset(
    {"item_handlers", "metrics", "performance_metrics", "init_timestamp_nsecs", "custom_metadata"}
)
ORBAX_ITEM_FILES = frozenset({"_METADATA", "manifest.ocdbt", "_sharding", "d", "array_metadatas"})
_MAX_METADATA_BYTES = 1 << 20


def is_orbax_step(storage: Storage, path: str, metadata: Any = None) -> bool:
    """True when the directory at ``path`` has an Orbax checkpoint's layout.

    Args:
        storage: where ``path`` lives.
        path: a step directory.
        metadata: its ``_CHECKPOINT_METADATA`` already parsed, if the caller has it (else it
            is read here, when small and not a link).
    """
    if metadata is None:
        metadata = _read_metadata_doc(storage, storage.join(path, COMMIT_FILE))
    if isinstance(metadata, dict) and metadata.get("format") == FORMAT:
        return False  # stepsafe's own record: never Orbax's, whatever else is in the step
    if isinstance(metadata, dict) and ORBAX_METADATA_KEYS & metadata.keys():
        return True
    for name in storage.list_dir(path):
        item = storage.join(path, name)
        if storage.is_link(item) or not storage.is_dir(item):
            continue
        for child in storage.list_dir(item):
            if child in ORBAX_ITEM_FILES or child.startswith("ocdbt.process_"):
                return True
    return False


def _read_metadata_doc(storage: Storage, path: str) -> Any:
    try:
        if not storage.exists(path) or storage.is_link(path):
            return None
        if storage.size(path) > _MAX_METADATA_BYTES:
            return None
        return json.loads(storage.read_bytes(path))
    except (OSError, ValueError, RecursionError, StepsafeError):  # a FIFO, a link: not a record
        return None


# -- Orbax's own completeness rules (orbax.checkpoint._src.path.atomicity, 0.11 - 0.12) --------
# A save on a POSIX disk writes ``<name>.orbax-checkpoint-tmp[-<timestamp>]`` and renames it to
# ``<name>`` when it finishes; on GCS (no atomic rename) it writes ``<name>`` in place and puts
# ``commit_success.txt`` in it last. Items are written the same way inside the step.
TMP_SUFFIX = ".orbax-checkpoint-tmp"
COMMIT_SUCCESS_FILE = "commit_success.txt"
ITEM_NAMES = ("items", "default", "state")  # MaxText's, a single-item manager's, older ones
_TMP_STEP = re.compile(r"^(?:.*_)?(\d+)" + re.escape(TMP_SUFFIX))


def orbax_tmp_step(name: str) -> int | None:
    """The step an Orbax temporary directory (``300.orbax-checkpoint-tmp-1764...``) is for,
    or None when ``name`` is not one (Orbax's ``TMP_DIR_STEP_PATTERN``)."""
    match = _TMP_STEP.match(name)
    return int(match.group(1)) if match else None


def is_item_dir(storage: Storage, path: str) -> bool:
    """True when ``path`` is an Orbax item directory (a PyTree: ``_METADATA``,
    ``manifest.ocdbt``, ``d/``, ``ocdbt.process_<n>/``)."""
    try:
        if storage.is_link(path) or not storage.is_dir(path):
            return False
        children = storage.list_dir(path)
    except OSError:
        return False
    return any(_item_file(c) for c in children)


def _item_file(name: str) -> bool:
    return name in ORBAX_ITEM_FILES or name.startswith("ocdbt.process_")


def item_names(storage: Storage, step_path: str) -> list[str]:
    """The item directories of an Orbax step (``items``, ``default``, ...), in
    ``ITEM_NAMES``' order first."""
    names = [
        n
        for n in storage.list_dir(step_path)
        if TMP_SUFFIX not in n
        and not _item_file(n)  # an item's own ``ocdbt.process_0/``, when the step is the item
        and is_item_dir(storage, storage.join(step_path, n))
    ]
    return sorted(names, key=lambda n: (ITEM_NAMES.index(n) if n in ITEM_NAMES else 99, n))


def orbax_incomplete_reason(storage: Storage, path: str) -> str | None:
    """Why the Orbax step at ``path`` is not complete by Orbax's own rules, or None when it is:
    its directory (or an item's) still has a temporary name, or on GCS it lacks
    ``commit_success.txt``."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if TMP_SUFFIX in name:
        return f"a temporary directory (*{TMP_SUFFIX}*): the Orbax save never finished"
    pending = [n for n in storage.list_dir(path) if TMP_SUFFIX in n]
    if pending:
        return f"its item {pending[0]} is still a temporary: the Orbax save never finished"
    if path.startswith("gs://") and not storage.exists(storage.join(path, COMMIT_SUCCESS_FILE)):
        return f"no {COMMIT_SUCCESS_FILE}: the Orbax save never finished"
    return None
