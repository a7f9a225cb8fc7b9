"""Which intact steps a manager's retention keeps: the newest ``max_to_keep`` (the default), or
the best ``max_to_keep`` by a metric plus the newest (Orbax's ``best_fn``/``best_mode``), and in
either case every step that is a multiple of ``keep_period``, kept for good and not counted.

Only the choice among intact steps lives here: damaged, linked, foreign and incomplete steps
keep ``gc.plan_gc``'s handling, which takes this choice as its ``kept``. Process 0 alone runs
it (the manager's retention runs only where the run's lease is held).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from stepsafe.manager.inventory import StepEntry
from stepsafe.manager.options import ManagerOptions

log = logging.getLogger("stepsafe")


def policy_of(options: ManagerOptions) -> Callable[[list[StepEntry]], dict[int, str]] | None:
    """``choose_kept`` with ``options``' settings, or None when they keep the newest (the
    default: retention then need not look at metrics)."""
    if options.best_fn is None and options.keep_period is None:
        return None
    return functools.partial(
        choose_kept,
        keep=options.max_to_keep,
        best_fn=options.best_fn,
        best_mode=options.best_mode,
        keep_period=options.keep_period,
    )


def choose_kept(
    done: Sequence[StepEntry],
    keep: int,
    *,
    best_fn: Callable[[dict[str, Any]], float] | None = None,
    best_mode: str = "max",
    keep_period: int | None = None,
) -> dict[int, str]:
    """The intact steps to keep, each with the reason a plan shows for it.

    Args:
        done: the intact (Complete) steps, oldest first, with the metrics their records hold.
        keep: how many to keep besides ``keep_period``'s (>= 1).
        best_fn: a step's metrics -> its score; None keeps the newest ``keep``. A step saved
            without metrics, or whose score is not a finite number (``best_fn`` raised, or
            returned NaN), counts as the worst: such steps go first, oldest first, and the
            newest step is kept whatever its score (a resume loads it).
        best_mode: ``"max"`` (higher scores are better) or ``"min"``.
        keep_period: steps that are a multiple of it are kept for good, not counted in ``keep``.

    Returns:
        `dict[int, str]`: step -> why it is kept.
    """
    kept: dict[int, str] = {}
    if keep_period:
        for e in done:
            if e.step % keep_period == 0:
                kept[e.step] = f"a multiple of keep_period {keep_period}, kept for good"
    counted = [e for e in done if e.step not in kept]
    if best_fn is None:
        for e in counted[-keep:]:
            kept[e.step] = f"among the newest {keep} intact"
        return kept
    sign = 1.0 if best_mode == "max" else -1.0

    def rank(e: StepEntry) -> tuple[bool, float, int]:
        score = _score(best_fn, e)
        return (score is not None, sign * score if score is not None else 0.0, e.step)

    for e in sorted(counted, key=rank)[-keep:]:
        kept[e.step] = f"among the best {keep} intact by best_fn ({best_mode})"
    if done:
        kept.setdefault(done[-1].step, "the newest intact step (a resume loads it)")
    return kept


def _score(best_fn: Callable[[dict[str, Any]], float], e: StepEntry) -> float | None:
    """``best_fn`` of ``e``'s metrics, or None (the worst) when it has none or no number."""
    if not e.metrics:
        return None
    try:
        score = float(best_fn(dict(e.metrics)))
    except Exception as err:  # a user's function: retention must not fail the save
        log.warning("best_fn failed on step %d's metrics %s: %r; it counts as the worst",
                    e.step, e.metrics, err)  # fmt: skip
        return None
    return score if math.isfinite(score) else None
