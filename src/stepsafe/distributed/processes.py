"""Which process this is, at no cost when JAX is absent or ``jax.distributed`` is not set up.

numpy users must never pay for importing JAX, so JAX is consulted only if the program already
imported it. Only process 0 of a job holds a run's lease (``manager.lease``).
"""

from __future__ import annotations

import sys
from types import ModuleType


def initialized_jax() -> ModuleType | None:
    """The ``jax`` module if it is imported and ``jax.distributed`` is initialised, else None."""
    jax = sys.modules.get("jax")
    is_initialized = getattr(getattr(jax, "distributed", None), "is_initialized", None)
    if jax is None or is_initialized is None or not is_initialized():
        return None
    return jax


def process_index() -> int:
    """This process's index in the ``jax.distributed`` job; 0 outside one."""
    jax = initialized_jax()
    return 0 if jax is None else int(jax.process_index())


def process_count() -> int:
    """How many processes the ``jax.distributed`` job has; 1 outside one."""
    jax = initialized_jax()
    return 1 if jax is None else int(jax.process_count())


def is_multiprocess() -> bool:
    """True when this process is one of several in an initialised ``jax.distributed`` job."""
    return process_count() > 1
