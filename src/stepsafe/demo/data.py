"""Synthetic, seeded, checkpointable training data.

Batch ``i`` is a pure function of (seed, i), so the iterator's whole state is its position:
restoring the position resumes the exact same stream. Sequences follow a hidden affine rule
(``t[j+1] = a * t[j] + b mod vocab``, ``a`` and ``b`` fixed by the seed) so the loss falls.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stepsafe.errors import ConfigError


class SyntheticData:
    """Grain-style iterator: ``next()``, ``get_state()``, ``set_state()``."""

    def __init__(self, seed: int, batch_size: int, length: int, vocab_size: int) -> None:
        self.seed, self.batch_size, self.length, self.vocab = seed, batch_size, length, vocab_size
        self.position = 0

    def __iter__(self) -> SyntheticData:
        return self

    def __next__(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        a, b = np.random.default_rng(self.seed).integers(1, self.vocab, size=2)
        start = rng.integers(0, self.vocab, size=(self.batch_size, 1))
        seq = np.empty((self.batch_size, self.length + 1), np.int32)
        seq[:, :1] = start
        for i in range(1, self.length + 1):
            seq[:, i : i + 1] = (a * seq[:, i - 1 : i] + b) % self.vocab
        return seq

    def get_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "position": self.position}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed:
            raise ConfigError(
                f"the checkpoint's data iterator state is for data seed {state.get('seed')}, this "
                f"run uses {self.seed}: resume with the same seed, or start a new run_name"
            )
        self.position = int(state["position"])
