"""``ManagerOptions``: how a ``CheckpointManager`` saves, one field per MaxText checkpoint flag.

The fields keep Python names of their own (a manager is a library object, usable without any
MaxText config); ``FLAGS`` says which MaxText flag sets each one, and every error names both, so
that a user who only ever wrote the flag still recognises the value that was refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stepsafe.errors import ConfigError
from stepsafe.format.writer import ALIGN

FLAGS = {
    "enable_checkpointing": "enable_checkpointing",
    "async_save": "async_checkpointing",
    "save_interval_steps": "checkpoint_period",
    "max_to_keep": "max_num_checkpoints_to_keep",
    "data_file_size_bytes": "checkpoint_storage_target_data_file_size_bytes",
    "concurrent_bytes": "checkpoint_storage_concurrent_gb",
    "enable_single_replica_ckpt_restoring": "enable_single_replica_ckpt_restoring",
    "replica_axis_index": "replica_axis_index",
    "best_fn": None,
    "best_mode": None,
    "keep_period": None,
    "local_directory": "local_checkpoint_directory",
    "local_save_interval_steps": "local_checkpoint_period",
    "local_max_to_keep": "local_checkpoint_max_to_keep",
    "multi_tier": "enable_multi_tier_checkpointing",
    "backup_interval_minutes": "multi_tier_checkpointing_backup_interval_minutes",
    "backup_interval_steps": "multi_tier_checkpointing_backup_interval_steps",
}
"""``ManagerOptions`` field -> the MaxText flag that sets it (``stepsafe train`` maps them).
``replica_axis_index`` is stepsafe's own flag: MaxText fixes it at 0 (its data axis). None: no
flag, library only: MaxText has none for ``best_fn``, ``best_mode`` or ``keep_period`` (Orbax's
names; a callable cannot be a command-line flag anyway). ``local_directory`` is the flag's
directory joined with the run's name (``stepsafe train`` does it); ``local_checkpoint_max_to_keep``
is stepsafe's own flag."""


@dataclass(frozen=True)
class ManagerOptions:
    """How a ``CheckpointManager`` saves: when, how many to keep, in the background or not.

    Args:
        enable_checkpointing (`bool`, defaults to `True`): save at all (flag
            ``enable_checkpointing``). A manager that only restores (an evaluator) passes False:
            it then takes no lease on the run and never deletes anything.
        async_save (`bool`, defaults to `True`): capture the state and write it in the
            background, one save at a time (flag ``async_checkpointing``).
        save_interval_steps (`int`, defaults to `10000`): ``save`` saves steps that are a
            multiple of this (flag ``checkpoint_period``).
        max_to_keep (`int`, defaults to `0`): keep the newest this many intact steps and delete
            older ones after each commit; 0 keeps all (flag ``max_num_checkpoints_to_keep``).
        data_file_size_bytes (`int`, *optional*): where data files are split; None: the
            storage's default, 2 GiB on a local disk, 128 MiB on buckets (flag
            ``checkpoint_storage_target_data_file_size_bytes``).
        concurrent_bytes (`int`, *optional*): bytes in flight to and from buckets at once, for
            this manager's saves and restores; None: the process default shared by every
            storage made without one (flag ``checkpoint_storage_concurrent_gb``, in GB).
        enable_single_replica_ckpt_restoring (`bool`, defaults to `False`): under several JAX
            processes, restores read data only in the processes of replica 0 along
            ``replica_axis_index``, and the others get the arrays over a JAX collective (flag
            ``enable_single_replica_ckpt_restoring``; see ``stepsafe.arrays.single_replica``
            for what targets it needs).
        replica_axis_index (`int`, defaults to `0`): the mesh axis along which the restored
            arrays are replicated (the data-parallel axis; flag ``replica_axis_index``,
            stepsafe's own: MaxText fixes it at 0).
        best_fn (`Callable[[dict], float]`, *optional*): retention by metric (Orbax's name):
            given a step's ``metrics`` (``save(..., metrics=...)``), its score; retention then
            keeps the ``max_to_keep`` best intact steps plus the newest. Steps saved without
            metrics (or whose ``best_fn`` raises) count as the worst, oldest first. None: keep
            the newest ``max_to_keep``. No flag.
        best_mode (`str`, defaults to `"max"`): ``"max"``: a higher score is better; ``"min"``:
            lower is better (a loss). No flag.
        keep_period (`int`, *optional*): steps that are a multiple of this are never deleted by
            retention (nor counted in ``max_to_keep``); None: none is kept for good. No flag.
        local_directory (`str`, *optional*): this process's local tier for the run, on a disk
            of its own host (``<local_checkpoint_directory>/<run_name>``); None: no local tier.
            With it (MaxText's emergency checkpoints) ``save`` also saves every
            ``local_save_interval_steps`` there, and a resume takes the newest step across
            both tiers (``manager/local_tier.py``).
        local_save_interval_steps (`int`, defaults to `0`): the local tier's period, >= 1 with
            ``local_directory`` (flag ``local_checkpoint_period``).
        local_max_to_keep (`int`, defaults to `2`): committed local steps each process keeps,
            >= 1 (flag ``local_checkpoint_max_to_keep``).
        multi_tier (`bool`, defaults to `False`): saves go to the local tier only, and a
            background promoter copies a committed local step to the persistent tier every
            backup interval (flag ``enable_multi_tier_checkpointing``); needs
            ``local_directory`` and exactly one backup interval.
        backup_interval_minutes (`float`, *optional*): promote at most this often (flag
            ``multi_tier_checkpointing_backup_interval_minutes``).
        backup_interval_steps (`int`, *optional*): promote every this many steps, a multiple
            of nothing in particular but >= ``local_save_interval_steps`` (flag
            ``multi_tier_checkpointing_backup_interval_steps``).

    Raises:
        ConfigError: a value out of range; the message names the field and its flag, e.g.
            "ManagerOptions.save_interval_steps must be >= 1 (flag checkpoint_period), got 0".

    Example:

    ```python
    from stepsafe import CheckpointManager, ManagerOptions

    options = ManagerOptions(save_interval_steps=100, max_to_keep=3)
    manager = CheckpointManager("outputs/run1/checkpoints", options)
    ```
    """

    enable_checkpointing: bool = True
    async_save: bool = True
    save_interval_steps: int = 10000
    max_to_keep: int = 0  # 0: keep all
    data_file_size_bytes: int | None = None  # None: the storage's default
    concurrent_bytes: int | None = None  # bytes in flight to/from buckets, this manager's
    enable_single_replica_ckpt_restoring: bool = False  # replica 0 reads, the others receive
    replica_axis_index: int = 0  # the data-parallel mesh axis
    best_fn: Callable[[dict[str, Any]], float] | None = None  # a step's metrics -> its score
    best_mode: str = "max"  # "max" or "min": which scores are best
    keep_period: int | None = None  # steps divisible by it are kept for good
    local_directory: str | None = None  # this process's local tier; None: none
    local_save_interval_steps: int = 0  # the local tier's period
    local_max_to_keep: int = 2  # committed local steps kept per process
    multi_tier: bool = False  # save locally only, promote to the persistent tier
    backup_interval_minutes: float | None = None  # promote at most this often
    backup_interval_steps: int | None = None  # or every this many steps

    def __post_init__(self) -> None:
        if self.save_interval_steps < 1:
            raise _error("save_interval_steps", "must be >= 1", self.save_interval_steps)
        if self.max_to_keep < 0:
            raise _error("max_to_keep", "must be >= 0 (0 keeps all)", self.max_to_keep)
        if self.concurrent_bytes is not None and self.concurrent_bytes < 1:
            raise _error("concurrent_bytes", "must be >= 1", self.concurrent_bytes)
        size = self.data_file_size_bytes
        if size is not None and size < ALIGN:  # what the writer can split at
            raise _error("data_file_size_bytes", f"must be >= {ALIGN} bytes", size)
        if type(self.replica_axis_index) is not int or self.replica_axis_index < 0:
            raise _error("replica_axis_index", "must be an int >= 0", self.replica_axis_index)
        if self.best_fn is not None and not callable(self.best_fn):
            raise _error("best_fn", "must be a callable or None", self.best_fn)
        if self.best_mode not in ("max", "min"):
            raise _error("best_mode", 'must be "max" or "min"', self.best_mode)
        period = self.keep_period
        if period is not None and (type(period) is not int or period < 1):
            raise _error("keep_period", "must be an int >= 1 or None", period)
        self._check_tiers()

    def _check_tiers(self) -> None:
        local = self.local_directory
        if local is not None and (not isinstance(local, str) or not local):
            raise _error("local_directory", "must be a non-empty path or None", local)
        if local is not None and self.local_save_interval_steps < 1:
            raise _error(
                "local_save_interval_steps", "must be >= 1 with a local directory",
                self.local_save_interval_steps,
            )  # fmt: skip
        if self.local_max_to_keep < 1:
            raise _error("local_max_to_keep", "must be >= 1", self.local_max_to_keep)
        minutes, steps = self.backup_interval_minutes, self.backup_interval_steps
        if not self.multi_tier:
            if minutes is not None or steps is not None:
                raise _error("multi_tier", "must be True for a backup interval", False)
            return
        if local is None:
            raise _error("local_directory", "must be set for multi-tier checkpointing", None)
        if (minutes is None) == (steps is None):
            raise ConfigError(
                "multi-tier checkpointing needs exactly one backup interval: "
                "ManagerOptions.backup_interval_minutes (flag "
                "multi_tier_checkpointing_backup_interval_minutes) or backup_interval_steps "
                f"(flag multi_tier_checkpointing_backup_interval_steps), got {minutes!r} and "
                f"{steps!r}"
            )
        if minutes is not None and not minutes > 0:
            raise _error("backup_interval_minutes", "must be > 0", minutes)
        if steps is not None and steps < self.local_save_interval_steps:
            raise _error(
                "backup_interval_steps",
                f"must be >= local_save_interval_steps ({self.local_save_interval_steps})",
                steps,
            )


def _error(field: str, rule: str, value: object) -> ConfigError:
    flag = FLAGS[field]
    where = f" (flag {flag})" if flag else ""
    return ConfigError(f"ManagerOptions.{field} {rule}{where}, got {value!r}")
