"""Deleting a checkpoint, and telling the files this format writes from anything else.

Users write into run directories too: a README beside the arrays, a symbolic link to shared
storage, another tool's checkpoint under a step-like name. Deleting is the one thing that cannot
be undone, so what may be deleted is decided by name, from the layout (layout.py): the commit
marker, ``items/manifest.<id>.json``, ``items/process_<p>.<n>.<id>.data`` and extra files
``<name>.<id>.<ext>``. Anything else, and every symbolic link, is never ours. Walks never follow
a link, so nothing outside the step is ever reached.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

from stepsafe.errors import DeletionError, ManifestError
from stepsafe.format.layout import ITEMS_DIR, METADATA_FILE, check_extra_name
from stepsafe.format.reader import CheckpointReader
from stepsafe.storage import Storage

_ID = r"(?P<id>[0-9a-f]{8,32})"  # as layout._SAVE_ID
_MANIFEST = re.compile(rf"^{ITEMS_DIR}/manifest\.{_ID}\.json$")
_DATA = re.compile(rf"^{ITEMS_DIR}/process_[0-9]+\.[0-9]{{5,}}\.{_ID}\.data$")
_EXTRA = re.compile(rf"^(?P<head>.+)\.{_ID}(?P<ext>\.[^./]+)?$")
_RETRIES = 5  # a concurrent deleter can make one pass of delete_tree trip; it rarely does twice


def save_id_of(relpath: str) -> str | None:
    """The save id stamped in ``relpath`` (relative to a step directory) when it is a name this
    format writes for a save, else None (the commit marker has no save id in its name)."""
    for pattern in (_MANIFEST, _DATA):
        m = pattern.match(relpath)
        if m:
            return m["id"]
    m = _EXTRA.match(relpath)
    if m is None or relpath.startswith(f"{ITEMS_DIR}/"):
        return None
    try:
        check_extra_name(m["head"] + (m["ext"] or ""), relpath)
    except ManifestError:
        return None
    return m["id"]


def is_own_file(relpath: str) -> bool:
    """True when ``relpath`` (relative to a step directory) is a name stepsafe writes."""
    return relpath == METADATA_FILE or save_id_of(relpath) is not None


@dataclass
class StepFiles:
    """What a step directory holds, found without following a single symbolic link."""

    files: list[str] = field(default_factory=list)  # plain files, relative to the step
    links: list[str] = field(default_factory=list)  # symbolic links (to files or directories)
    errors: list[str] = field(default_factory=list)  # "relpath: reason" for unreadable entries

    @property
    def foreign(self) -> list[str]:
        """Entries stepsafe did not write: every link, every file with another name."""
        return sorted(self.links + [f for f in self.files if not is_own_file(f)])

    @property
    def own(self) -> list[str]:
        return [f for f in self.files if is_own_file(f)]


def walk_step(storage: Storage, path: str) -> StepFiles:
    """Every file under the step directory ``path``; links are listed, never entered."""
    found = StepFiles()
    dirs = [""]
    while dirs:
        rel = dirs.pop()
        try:
            names = storage.list_dir(storage.join(path, rel) if rel else path)
        except OSError as e:
            found.errors.append(f"{rel or '.'}: {e.strerror or e}")
            continue
        for name in names:
            child = f"{rel}/{name}" if rel else name
            full = storage.join(path, child)
            if storage.is_link(full):
                found.links.append(child)
            elif storage.is_dir(full):
                dirs.append(child)
            else:
                found.files.append(child)
    found.files.sort()
    found.links.sort()
    return found


def delete_checkpoint(storage: Storage, path: str) -> None:
    """Delete a checkpoint, its commit marker first: a half-deleted step never looks complete.

    What another deleter (a ``stepsafe gc`` beside a training run's retention) removed first is
    simply gone: that is the outcome asked for, not a failure.

    Raises:
        DeletionError: ``path`` is a symbolic link (deleting through it would delete another
            directory's files).
        OSError: the storage refused (read-only, permissions).
    """
    if storage.is_link(path):
        raise DeletionError(
            f"{path} is a symbolic link: stepsafe never deletes through one; remove the link "
            "itself if it is no longer needed"
        )
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        storage.delete_file(storage.join(path, METADATA_FILE))
    delete_tree(storage, path)


def delete_tree(storage: Storage, path: str) -> None:
    """``storage.delete_tree`` where a file or the whole tree vanishing meanwhile is fine."""
    for _ in range(_RETRIES):
        try:
            storage.delete_tree(path)
            return
        except FileNotFoundError:
            if not storage.exists(path) and not storage.is_link(path):
                return  # all gone; else something under it went first: delete the rest
    storage.delete_tree(path)


def delete_file(storage: Storage, path: str) -> None:
    """``storage.delete_file`` where a file already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        storage.delete_file(path)


def stray_files(storage: Storage, path: str, walked: StepFiles | None = None) -> list[str]:
    """Files in the committed step at ``path`` that an earlier save of the same step left: named
    as this format names them but stamped with another save id, and not named by the commit.
    A save that died, or lost a race on a bucket, leaves them (a local save renames its own
    directory into place, so only buckets have them). Links and foreign files never are.

    Raises:
        StepsafeError: the step is not a committed, intact checkpoint (nothing is a stray then).
    """
    with CheckpointReader(storage, path) as reader:
        meta = reader.metadata
        named = {f"{ITEMS_DIR}/{name}" for name in reader.manifest.files}
    walked = walked if walked is not None else walk_step(storage, path)
    return sorted(
        storage.join(path, f)
        for f in walked.files
        if save_id_of(f) not in (None, meta.save_id) and f not in named
    )
