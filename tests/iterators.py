"""Data iterators for tests: the two shapes of state a real one has (Grain's is a position)."""

from __future__ import annotations

from typing import Any


class Counter:
    """A Grain-style iterator whose whole state is its position."""

    def __init__(self) -> None:
        self.position = 0

    def get_state(self) -> dict[str, int]:
        return {"position": self.position}

    def set_state(self, state: dict[str, int]) -> None:
        self.position = state["position"]


class Opaque:
    """An iterator whose state is whatever it was given (JSON, bytes, or something refused)."""

    def __init__(self, state: Any = None) -> None:
        self.state = state

    def get_state(self) -> Any:
        return self.state

    def set_state(self, state: Any) -> None:
        self.state = state
