"""A manager's tiers from its options: the local tier, and the promoter of multi-tier mode."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from stepsafe.checkpoint import committed_steps
from stepsafe.distributed import is_multiprocess
from stepsafe.manager.local_tier import LocalTier
from stepsafe.manager.options import ManagerOptions
from stepsafe.manager.promoter import Promoter
from stepsafe.storage import Storage

log = logging.getLogger("stepsafe")


def local_tier_for(
    options: ManagerOptions, tag: str, storage: Storage, directory: str
) -> LocalTier | None:
    """This process's local tier beside the persistent one (``directory`` on ``storage``);
    None without ``local_directory``, or for a manager that only reads (it saves nothing, and
    must not clean what it did not write). Its data files split at ``data_file_size_bytes``,
    or in multi-tier mode at the persistent storage's default (its files are promoted as they
    are: a bucket wants them smaller)."""
    if options.local_directory is None or not options.enable_checkpointing:
        return None
    file_size = options.data_file_size_bytes
    if file_size is None and options.multi_tier:
        file_size = storage.default_file_size
    persistent = directory if "://" in directory else os.path.abspath(directory)
    if is_multiprocess() and options.local_max_to_keep == 1:
        log.warning(
            "local_checkpoint_max_to_keep=1 under several processes: each deletes its older "
            "local step once its own newer one commits, so a kill between two processes' "
            "commits leaves no local step all of them hold; 2 (the default) keeps one"
        )
    return LocalTier(
        options.local_directory, options.local_save_interval_steps, options.local_max_to_keep,
        tag, persistent=persistent, file_size=file_size,
    )  # fmt: skip


def promoter_for(
    options: ManagerOptions,
    local: LocalTier | None,
    storage: Storage,
    directory: str,
    blocked: Callable[[int], bool],
    retention: Callable[[], None],
) -> Promoter | None:
    """The promoter of multi-tier mode (None otherwise), counting its interval from the
    persistent tier's newest step; local retention keeps the steps it still has to copy."""
    if not options.multi_tier or local is None:
        return None
    steps = committed_steps(storage, directory) if storage.is_dir(directory) else []
    promoter = Promoter(
        local, storage, directory,
        every_steps=options.backup_interval_steps, every_minutes=options.backup_interval_minutes,
        blocked=blocked, retention=retention, last_step=steps[-1] if steps else None,
        file_size=options.data_file_size_bytes,
    )  # fmt: skip
    local.pinned = promoter.pinned
    return promoter
