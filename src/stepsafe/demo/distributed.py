"""Start ``jax.distributed`` for the demo trainer when the flags (or JAX's variable) ask for it.

MaxText initialises ``jax.distributed`` itself on TPU and GPU clusters; the demo does it only
when a coordinator is named (``jax_coordinator_address``, else JAX's own
``JAX_COORDINATOR_ADDRESS``), so that a plain ``stepsafe train`` stays one process. The number
of processes and this one's index come from ``jax_num_processes`` and ``jax_process_id``
(JAX reads no variable for them), else from JAX's cluster detection (Slurm, Open MPI, ...).
"""

from __future__ import annotations

import os

import jax

from stepsafe.config import Config
from stepsafe.errors import ConfigError


def coordinator_address(config: Config) -> str:
    """The coordinator's ``host:port`` from the flag, else from ``JAX_COORDINATOR_ADDRESS``;
    empty: no job of several processes is asked for."""
    return config.jax_coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")


def start_distributed(config: Config) -> bool:
    """Initialise ``jax.distributed`` if the configuration names a coordinator.

    JAX's preemption notifier is turned off first: stepsafe's ``StopRequest`` handles SIGTERM
    at step boundaries on every process, and the notifier would otherwise swallow a SIGTERM
    that arrives outside the training loop (during start-up or a restore), leaving a process
    that neither stops nor saves.

    Args:
        config (`Config`): the run's flags.

    Returns:
        `bool`: True when the process is part of a ``jax.distributed`` job (started here, or
        earlier by the caller).

    Raises:
        ConfigError: ``jax_num_processes`` above 1 without a coordinator, or JAX could not
            start the job (unreachable coordinator, missing process count or index).
    """
    if jax.distributed.is_initialized():
        return True
    address = coordinator_address(config)
    if not address:
        if (config.jax_num_processes or 1) > 1:
            raise ConfigError(
                f"jax_num_processes={config.jax_num_processes} needs a coordinator: set "
                "jax_coordinator_address=HOST:PORT (or JAX_COORDINATOR_ADDRESS) on every process"
            )
        return False
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=config.jax_num_processes,
            process_id=config.jax_process_id,
            initialization_timeout=config.jax_distributed_initialization_timeout,
        )
    except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(
            f"cannot join the jax.distributed job at {address} as process "
            f"{config.jax_process_id} of {config.jax_num_processes}: {first}; check "
            "jax_coordinator_address, jax_num_processes and jax_process_id on every process"
        ) from e
    return True
