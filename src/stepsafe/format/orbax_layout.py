"""Recognise a step directory that Orbax wrote, without reading any of its arrays.

Orbax and stepsafe share the ``_CHECKPOINT_METADATA`` name (stepsafe writes Orbax's keys too), so
that file alone does not say whose a step is: stepsafe's carries ``"format": "stepsafe"``.
Orbax's item directories (``default/``, ``state/``, MaxText's ``items/``) hold ``_METADATA``, and
with OCDBT a ``manifest.ocdbt``, ``d/`` and ``ocdbt.process_<n>/``. Listing and deleting code
uses this to leave such steps alone; converting code to know what it can import.
"""

from __future__ import annotations

import json
from typing import Any

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
    if (
        isinstance(metadata, dict)
        and metadata.get("format") != FORMAT
        and ORBAX_METADATA_KEYS & metadata.keys()
    ):
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
        if storage.is_link(path) or storage.size(path) > _MAX_METADATA_BYTES:
            return None
        return json.loads(storage.read_bytes(path))
    except (OSError, ValueError, RecursionError):
        return None
