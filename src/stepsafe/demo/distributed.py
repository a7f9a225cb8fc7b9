"""Start ``jax.distributed`` for the demo trainer when the flags (or JAX's variable) ask for it.

MaxText initialises ``jax.distributed`` itself on TPU and GPU clusters; the demo does it only
when a coordinator is named (``jax_coordinator_address``, else JAX's own
``JAX_COORDINATOR_ADDRESS``), so that a plain ``stepsafe train`` stays one process. The number
of processes and this one's index come from ``jax_num_processes`` and ``jax_process_id``
(JAX reads no variable for them), else from JAX's cluster detection (Slurm, Open MPI, ...).
"""

from __future__ import annotations

import os
import socket
import time

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
    if config.jax_process_id not in (None, 0):  # process 0 starts the coordinator
        _wait_for_coordinator(address, config.jax_distributed_initialization_timeout)
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


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once the coordinator at ``address`` accepts connections.

    JAX aborts the whole process (no exception, no exit handlers) when it cannot register with
    the coordinator in time; trying the port first turns that into a clear error.

    Raises:
        ConfigError: the address is not HOST:PORT, or nothing listens there within ``timeout_s``.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ConfigError(f"jax_coordinator_address={address!r} must be HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"cannot reach the jax.distributed coordinator at {address} within "
                    f"{timeout_s:g} s ({e.strerror or e}): start process 0 first, or check "
                    "jax_coordinator_address and jax_distributed_initialization_timeout"
                ) from e
            time.sleep(0.2)
