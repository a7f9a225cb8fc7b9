"""Which of MaxText's four kinds a checkpoint is, guessed from its manifest alone.

Two independent axes (MaxText's naming):

- **training vs param-only**: a training checkpoint carries optimizer state, i.e. a top-level
  ``opt_state`` subtree; a param-only (inference) checkpoint does not.
- **stacked vs unstacked**: a heuristic, because nothing in a tree says "these were scanned".
  *Stacked*: some subtree named ``layers`` holds at least one array, and all of its arrays have
  at least one axis and share the same leading dimension (the layer count, as ``lax.scan``
  needs). *Unstacked*: some key is ``layers_<n>`` or ``layer_<n>`` (one subtree per layer, as
  published models store them). When both or neither appear the answer is ``unknown``: say so
  rather than guess. Only ``params`` is examined when it exists, so the optimizer's mirror of
  the parameters never decides the answer on its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stepsafe.tree import split

OPT_STATE = "opt_state"
PARAMS = "params"
STACK_KEY = "layers"
_UNSTACKED_KEY = re.compile(r"^layers?_\d+$")


@dataclass(frozen=True)
class CheckpointKind:
    training: bool
    stacking: str  # "stacked" | "unstacked" | "unknown"
    evidence: str  # one line saying why, for people who doubt the heuristic

    @property
    def label(self) -> str:
        """MaxText's name: e.g. "Stacked Training Checkpoint"."""
        what = "Training" if self.training else "Param-only (Inference)"
        how = {"stacked": "Stacked ", "unstacked": "Unstacked "}.get(self.stacking, "")
        return f"{how}{what} Checkpoint"


def classify(shapes: Mapping[str, Sequence[int]], value_keys: Sequence[str] = ()) -> CheckpointKind:
    """Kind of a checkpoint from its arrays' key paths -> shapes (and inline values' keys)."""
    all_keys = [*shapes, *value_keys]
    training = any(split(k)[:1] == [OPT_STATE] for k in all_keys)
    scope = [k for k in shapes if split(k)[:1] == [PARAMS]] or list(shapes)
    stacked = _stacked_evidence(scope, shapes)
    unstacked = sorted({seg for k in scope for seg in split(k) if _UNSTACKED_KEY.match(seg)})
    if stacked and not unstacked:
        stacking, evidence = "stacked", stacked
    elif unstacked and not stacked:
        shown = ", ".join(unstacked[:3]) + (", ..." if len(unstacked) > 3 else "")
        stacking, evidence = "unstacked", f"per-layer subtrees {shown}"
    elif stacked:
        stacking, evidence = "unknown", f"both {stacked} and per-layer subtrees"
    else:
        stacking, evidence = "unknown", "no 'layers' subtree and no 'layers_<n>' keys"
    opt = f"has {OPT_STATE}" if training else f"no {OPT_STATE}"
    return CheckpointKind(training, stacking, f"{opt}; {evidence}")


def _stacked_evidence(keys: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> str:
    """'<prefix>/layers/* share axis A of length N' for the first ``layers`` subtree whose
    arrays share a layer axis: the leading one, or MaxText's ``param_scan_axis`` (1)."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        segs = split(k)
        for i, seg in enumerate(segs[:-1]):
            if seg == STACK_KEY:
                groups.setdefault("/".join(segs[: i + 1]), []).append(k)
                break
    for prefix, members in groups.items():
        for axis, name in ((0, "leading axis"), (1, "axis 1, of length")):
            sizes = {tuple(shapes[k])[axis : axis + 1] for k in members}
            if len(sizes) == 1 and sizes != {()}:
                (n,) = next(iter(sizes))
                return f"{prefix}/* share {name} {n}"
    return ""
