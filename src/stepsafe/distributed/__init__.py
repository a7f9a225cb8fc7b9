"""Access to the jax.distributed coordinator: process facts and small exchanges with timeouts.

This layer sits after ``format`` and before ``arrays`` and ``checkpoint``: a save under many
processes coordinates inside ``checkpoint.save``. Every touch of JAX's private
coordinator client lives in :mod:`stepsafe.distributed.client`; everything else goes through
:class:`Coordinator`, which has a trivial local implementation for a single process, so that
callers need no branches.
"""

from __future__ import annotations

from stepsafe.distributed.coordinator import Coordinator, coordinator
from stepsafe.distributed.processes import is_multiprocess, process_count, process_index
from stepsafe.errors import CoordinationError

__all__ = [
    "CoordinationError",
    "Coordinator",
    "coordinator",
    "is_multiprocess",
    "process_count",
    "process_index",
]
