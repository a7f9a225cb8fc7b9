"""A ``CheckpointManager``'s restores: a step, or the newest across both tiers.

Kept apart from manager.py (saving and the run's life) because restoring is the other half of
a manager's job, with its own rules: a damaged step is passed by, never deleted; with a local
tier the newest step that every process can restore whole wins (tiers.py).
"""

from __future__ import annotations

from typing import Any

from stepsafe.arrays.single_replica import SingleReplica
from stepsafe.checkpoint.inspect import metadata as saved_tree
from stepsafe.checkpoint.run_layout import check_step
from stepsafe.errors import CheckpointNotFoundError, ConfigError
from stepsafe.manager.existing_steps import PassedSteps
from stepsafe.manager.iterator_state import CheckpointableIterator
from stepsafe.manager.local_tier import LocalTier
from stepsafe.manager.resume import restore_newest, restore_step
from stepsafe.manager.tiers import restore_across_tiers, restore_local_step
from stepsafe.storage import Storage


class Restoring:
    """The restore methods of ``CheckpointManager`` (which sets these attributes)."""

    storage: Storage
    directory: str
    local: LocalTier | None
    restored_path: str
    _passed: PassedSteps
    _single_replica: SingleReplica | None

    def all_steps(self) -> list[int]:
        raise NotImplementedError

    def step_path(self, step: int) -> str:
        raise NotImplementedError

    def _wait_all(self) -> None:
        raise NotImplementedError

    def metadata(self, step: int, *, select: Any = None) -> Any:
        """``stepsafe.metadata`` of ``step``: the saved tree with array shapes, dtypes and
        shardings (the manifest only, no array bytes). Read-only: any process may call it.

        Raises:
            CheckpointNotFoundError: there is no step ``step``.
            CorruptCheckpointError: its record or manifest is damaged.
        """
        return saved_tree(self.step_path(check_step(step)), select=select)

    def restore(
        self,
        step: int | None = None,
        target: Any = None,
        *,
        data_iterator: CheckpointableIterator | None = None,
        select: Any = None,
    ) -> Any:
        """Restore ``step`` and the data iterator's position.

        Args:
            step (`int`, *optional*): the step to restore (from the persistent tier, or from
                the local tier when only it holds the step on every process); None: the newest
                committed step that restores (see ``restore_newest``).
            target (`Any`, *optional*): what to restore onto, as ``stepsafe.restore`` takes it
                (e.g. ``jax.eval_shape`` of the initial state, for dtypes and shardings).
            data_iterator (`CheckpointableIterator`, *optional*): its ``set_state`` is called
                with the state saved with the step.
            select (`str` or sequence, *optional*): restore only this subtree (a key path,
                as ``stepsafe.restore`` takes it); needs ``step``.

        Returns:
            `Any`: the state, as ``stepsafe.restore`` returns it.

        Raises:
            CheckpointNotFoundError: ``step`` (or, for None, any committed step) is not there.
            CorruptCheckpointError: ``step`` (or, for None, every committed step) is damaged.
            TargetMismatchError: ``target`` does not fit the checkpoint.
            StepsafeError: ``data_iterator`` given, and the step holds no iterator state.

        Example:

        ```python
        state = manager.restore(300, abstract_state, data_iterator=data)
        ```
        """
        if step is None and select is None:
            return self.restore_newest(target, data_iterator=data_iterator)[1]
        if step is None:
            raise ConfigError("restore(select=...) needs a step: e.g. manager.latest_step()")
        self._wait_all()
        step = check_step(step)
        local = self.local
        if local is not None and step not in self.all_steps():
            held = [step in steps for steps in local.steps_by_process()]  # alike everywhere
            if any(held) and not all(held):
                raise CheckpointNotFoundError(
                    f"step {step} is not in the persistent tier, and in the local tier of "
                    f"process(es) {', '.join(str(p) for p, h in enumerate(held) if h)} only: "
                    "restore a step every process holds (manager.latest_step()), or one of "
                    "the persistent tier's (manager.all_steps())"
                )
            if all(held):
                state = restore_local_step(local, step, target, data_iterator, select)
                if select is None:
                    local.resumed_at(step)
                return state
        state = restore_step(
            self.storage, self.step_path(step), step, target, data_iterator,
            self._single_replica, select,
        )  # fmt: skip
        if local is not None and select is None:
            local.resumed_at(step)  # a whole state: the run goes on from here
        return state

    def restore_newest(
        self, target: Any = None, *, data_iterator: CheckpointableIterator | None = None
    ) -> tuple[int, Any]:
        """(step, state) of the newest committed step that restores.

        A resume must not stop at a damaged latest step (a flipped bit, a truncated file) when
        an older one is intact: the damaged step is logged at ERROR and skipped, and left in
        place, untouched, for the user to inspect (``stepsafe verify``); nothing is deleted.

        Args:
            target (`Any`, *optional*): what to restore onto (see ``restore``).
            data_iterator (`CheckpointableIterator`, *optional*): restored with the step.

        Returns:
            `tuple[int, Any]`: the step restored and its state.

        Raises:
            CheckpointNotFoundError: there is no committed step.
            CorruptCheckpointError: every committed step is damaged.
            TargetMismatchError: ``target`` does not fit the newest intact step.

        Example:

        ```python
        if manager.latest_step() is not None:
            step, state = manager.restore_newest(abstract_state, data_iterator=data)
        ```
        """
        self._wait_all()
        steps = self.all_steps()

        def persistent(among: list[int]) -> tuple[int, Any]:
            return restore_newest(
                self.storage, self.directory, among, target, data_iterator,
                self._passed.damaged, self._single_replica,
            )  # fmt: skip

        path = ""
        if self.local is None:
            step, state = persistent(steps)
        else:
            step, state, path = restore_across_tiers(
                self.local, steps, target, data_iterator, persistent
            )
            self.local.resumed_at(step)
        self.restored_path = path or self.step_path(step)
        return step, state
