"""Deleting a checkpoint, and telling the files this format writes from anything else.

Users write into run directories too: a README beside the arrays, a symbolic link to shared
storage, another tool's checkpoint under a step-like name. Deleting is the one thing that cannot
be undone, so what may be deleted is decided from the layout (layout.py): the commit marker,
``items/manifest.<id>.json`` and ``items/process_<p>.<n>.<id>.data`` (names no user writes), and
extra files ``<name>.<id>.<ext>`` only where the commit names them, or, in a step without one,
where an ``items/`` file carries the same save id: users name files so too (a date, a content
hash). Anything else, and every symbolic link, is never ours. Walks never follow a link, so
nothing outside the step is ever reached.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from dataclasses import dataclass, field

from stepsafe.errors import DeletionError, ManifestError
from stepsafe.format.layout import (
    COMMIT_FILE,
    ITEMS_DIR,
    CommitRecord,
    check_extra_name,
)
from stepsafe.format.reader import CheckpointReader
from stepsafe.storage import Storage

_ID = r"(?P<id>[0-9a-f]{8,32})"  # as layout._SAVE_ID
_MANIFEST = re.compile(rf"^{ITEMS_DIR}/manifest\.{_ID}\.json$")
_DATA = re.compile(rf"^{ITEMS_DIR}/process_[0-9]+\.[0-9]{{5,}}\.{_ID}\.data$")
_PART = re.compile(rf"^{ITEMS_DIR}/part_[0-9]+\.{_ID}\.json$")
_EXTRA = re.compile(rf"^(?P<head>.+)\.{_ID}(?P<ext>\.[^./]+)?$")
_RETRIES = 5  # a concurrent deleter can make one pass of delete_tree trip; it rarely does twice


def items_save_id(relpath: str) -> str | None:
    """The save id in ``relpath`` (relative to a step directory) when it is an ``items/`` file
    this format writes, a manifest, a data file or a part file, else None. No user names
    files so."""
    for pattern in (_MANIFEST, _DATA, _PART):
        m = pattern.match(relpath)
        if m:
            return m["id"]
    return None


def extra_save_id(relpath: str) -> str | None:
    """The save id in ``relpath`` when it is shaped like an extra file, ``<name>.<id>.<ext>``,
    else None. Users name files so too (``eval.20241130.json``), so the shape alone never makes
    a file ours: see ``foreign_files``."""
    m = _EXTRA.match(relpath)
    if m is None or relpath.startswith(f"{ITEMS_DIR}/"):
        return None
    try:
        check_extra_name(m["head"] + (m["ext"] or ""), relpath)
    except ManifestError:
        return None
    return m["id"]


def foreign_files(walked: StepFiles, meta: CommitRecord | None) -> list[str]:
    """Entries of a step that stepsafe did not write: every link, and every file but these.

    In a committed step (``meta``, its parsed metadata): the marker, the extra files the commit
    names, ``items/`` manifests and data files (of any save id: an earlier save's are strays,
    see ``stray_files``), and extra-shaped files stamped with the id of such an earlier save.
    Without committed metadata (a half-deleted step, a save that died): the marker, ``items/``
    files, and extra-shaped files stamped with the save id of one of those ``items/`` files.
    An extra-shaped file with no ``items/`` file of its save id beside it is foreign: so, with
    no ``items/`` file at all, is every file but the marker (the step is not ours).
    """
    items_ids = {items_save_id(f) for f in walked.files} - {None}
    if meta is not None:  # the commit names all its extra files: another one is not its save's
        items_ids.discard(meta.save_id)
    ours = {f for f in walked.files if extra_save_id(f) in items_ids}
    if meta is not None:
        ours.update(meta.extra_path(name) for name in meta.extra_files)
    ours.add(COMMIT_FILE)
    files = [f for f in walked.files if f not in ours and items_save_id(f) is None]
    return sorted(walked.links + files)


def has_items(walked: StepFiles) -> bool:
    """Whether the step holds an ``items/`` manifest or data file: the least a step needs to be
    taken for stepsafe's without a commit naming its files."""
    return any(items_save_id(f) is not None for f in walked.files)


def named_like_ours(relpath: str) -> bool:
    """Whether ``relpath`` is named as this format names files: enough only inside a
    directory whose own name is stepsafe's (a save's temporary)."""
    return (
        relpath == COMMIT_FILE
        or items_save_id(relpath) is not None
        or extra_save_id(relpath) is not None
    )


@dataclass
class StepFiles:
    """What a step directory holds, found without following a single symbolic link."""

    files: list[str] = field(default_factory=list)  # plain files, relative to the step
    links: list[str] = field(default_factory=list)  # symbolic links (to files or directories)
    errors: list[str] = field(default_factory=list)  # "relpath: reason" for unreadable entries


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
    Then its extra files, so that what a deletion cut short leaves still holds the ``items/``
    files that make it recognisably ours (``foreign_files``), then the rest.

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
        storage.delete_file(storage.join(path, COMMIT_FILE))
    for f in walk_step(storage, path).files:
        if not f.startswith(f"{ITEMS_DIR}/"):
            with contextlib.suppress(NotADirectoryError):
                delete_file(storage, storage.join(path, f))
    delete_tree(storage, path)


def delete_tree(storage: Storage, path: str) -> None:
    """``storage.delete_tree`` where a file or the whole tree vanishing meanwhile is fine.

    Raises:
        OSError: the storage refused; its ``filename`` is the full path of the entry refused
            (``shutil.rmtree`` names only the entry's bare name).
    """
    try:
        for _ in range(_RETRIES):
            try:
                storage.delete_tree(path)
                return
            except FileNotFoundError:
                if not storage.exists(path) and not storage.is_link(path):
                    return  # all gone; else something under it went first: delete the rest
        storage.delete_tree(path)
    except OSError as e:
        e.filename = _full_name(storage, path, e.filename)
        raise


def _full_name(storage: Storage, path: str, name: object) -> object:
    """Where under ``path`` the entry ``name`` that a deletion refused lies, when ``name`` is
    bare (or relative): the one entry so named, else the name under ``path``."""
    if not isinstance(name, str) or name.startswith(("/", path)) or "://" in name:
        return name
    walked = walk_step(storage, path)
    dirs = {posixpath.dirname(f) for f in walked.files + walked.links if "/" in f}
    found = [f for f in walked.files + walked.links + sorted(dirs) if f.endswith(name)]
    found = [f for f in found if f == name or f.endswith("/" + name)]
    return storage.join(path, found[0] if len(found) == 1 else name)


def delete_file(storage: Storage, path: str) -> None:
    """``storage.delete_file`` where a file already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        storage.delete_file(path)


def stray_files(storage: Storage, path: str, walked: StepFiles | None = None) -> list[str]:
    """Files in the committed step at ``path`` that an earlier save of the same step left:
    ``items/`` manifests and data files stamped with another save id and not named by the
    commit, and extra-shaped files stamped with the id of such a file. A save that died, or lost
    a race on a bucket, leaves them (a local save renames its own directory into place, so only
    buckets have them). Links and foreign files never are, nor an extra-shaped file whose id no
    such ``items/`` file carries: a user's ``eval.20241130.json`` has that shape (a dead save's
    iterator state left alone is a few bytes).

    Raises:
        StepsafeError: the step is not a committed, intact checkpoint (nothing is a stray then).
    """
    with CheckpointReader(storage, path) as reader:
        meta = reader.record
        named = set(reader.named_files())
    walked = walked if walked is not None else walk_step(storage, path)
    items = [f for f in walked.files if items_save_id(f) not in (None, meta.save_id)]
    items = [f for f in items if f not in named]
    dead = {items_save_id(f) for f in items}
    extras = [f for f in walked.files if extra_save_id(f) in dead]
    return sorted(storage.join(path, f) for f in items + extras)
