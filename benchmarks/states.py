"""The training states the benchmark saves, as specs (shapes) and as random numpy values.

Restore cases need only the specs, so they never pay for generating values; save cases build
values leaf by leaf, converting each one at once, so that peak memory stays near one state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

Key = tuple[str, ...]
DTYPE = np.dtype(np.float32)
VOCAB = 32000
LAYERS = 10


@dataclass(frozen=True)
class Spec:
    """One array leaf: its key path and shape (all leaves are float32)."""

    key: Key
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPE.itemsize


def _transformer_params(width: int) -> list[tuple[Key, tuple[int, ...]]]:
    """Embedding, then per layer attention q/k/v/o, MLP up/down with biases, two layer norms."""
    out: list[tuple[Key, tuple[int, ...]]] = [(("embed", "embedding"), (VOCAB, width))]
    for i in range(LAYERS):
        layer = f"layer_{i:02d}"
        for name in ("q", "k", "v", "o"):
            out.append(((layer, "attn", name, "kernel"), (width, width)))
        out.append(((layer, "mlp", "up", "kernel"), (width, 4 * width)))
        out.append(((layer, "mlp", "up", "bias"), (4 * width,)))
        out.append(((layer, "mlp", "down", "kernel"), (4 * width, width)))
        out.append(((layer, "mlp", "down", "bias"), (width,)))
        for ln in ("ln_1", "ln_2"):
            out.append(((layer, ln, "scale"), (width,)))
            out.append(((layer, ln, "bias"), (width,)))
    out.append((("final_ln", "scale"), (width,)))
    out.append((("final_ln", "bias"), (width,)))
    return out


def _with_adam(params: list[tuple[Key, tuple[int, ...]]]) -> list[Spec]:
    """Parameters plus Adam's first and second moments (mu, nu) of the same shapes."""
    specs = [Spec(("params", *k), s) for k, s in params]
    for moment in ("mu", "nu"):
        specs += [Spec(("opt_state", moment, *k), s) for k, s in params]
    return specs


def specs(state: str) -> list[Spec]:
    """The array leaves of ``state``; every state also holds a scalar ``step``."""
    if state == "tiny":
        return [Spec(("params", f"a{i:03d}"), (256,)) for i in range(100)]
    if state == "m95":
        return _with_adam(_transformer_params(768))
    if state == "l4g":
        return _with_adam(_transformer_params(1536))
    if state == "l12g":
        return _with_adam(_transformer_params(2816))
    raise ValueError(f"unknown state {state!r} ({', '.join(STATES)})")


STATES = ("tiny", "m95", "l4g", "l12g")
# States too big for every method on the benchmark machine (12.5 GB of 23.5 GiB): stepsafe, the
# raw baseline and the disk's limit only, so the trend with size stays visible.
ONLY = {"l12g": ("stepsafe", "raw", "disk")}
STEP = 1000


def nbytes(state: str) -> int:
    """Bytes of array data in ``state`` (the step is negligible)."""
    return sum(s.nbytes for s in specs(state))


def random_leaves(state: str, seed: int = 0) -> Iterator[tuple[Spec, np.ndarray]]:
    """Uniform random float32 values, one leaf at a time (incompressible, like real weights)."""
    rng = np.random.default_rng(seed)
    for spec in specs(state):
        yield spec, rng.random(spec.shape, dtype=np.float32)


def nest(items: list[tuple[Key, Any]]) -> dict[str, Any]:
    """Key paths -> nested dicts, the shape every framework's state dict has."""
    root: dict[str, Any] = {}
    for key, value in items:
        node = root
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return root


def build(state: str, convert: Callable[[np.ndarray], Any] = lambda a: a) -> dict[str, Any]:
    """A nested ``{"step", "params", "opt_state"}`` state, each leaf passed through ``convert``."""
    tree = nest([(spec.key, convert(values)) for spec, values in random_leaves(state)])
    tree["step"] = STEP
    return tree


def flat_name(key: Key) -> str:
    """One string per leaf, for flat formats (safetensors, the raw baseline)."""
    return "/".join(key)
