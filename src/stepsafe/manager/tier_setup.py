"""A manager's tiers from its options: the local tier, and the promoter of multi-tier mode."""

from __future__ import annotations

from collections.abc import Callable

from stepsafe.checkpoint import committed_steps
from stepsafe.manager.local_tier import LocalTier
from stepsafe.manager.options import ManagerOptions
from stepsafe.manager.promoter import Promoter
from stepsafe.storage import Storage


def local_tier_for(options: ManagerOptions, tag: str) -> LocalTier | None:
    """This process's local tier; None without ``local_directory``, or for a manager that
    only reads (it saves nothing, and must not clean what it did not write)."""
    if options.local_directory is None or not options.enable_checkpointing:
        return None
    return LocalTier(
        options.local_directory, options.local_save_interval_steps, options.local_max_to_keep,
        tag,
    )  # fmt: skip


def promoter_for(
    options: ManagerOptions,
    local: LocalTier | None,
    storage: Storage,
    directory: str,
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
        retention=retention, last_step=steps[-1] if steps else None,
    )  # fmt: skip
    local.pinned = promoter.pinned
    return promoter
