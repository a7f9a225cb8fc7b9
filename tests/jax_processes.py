"""Start N real Python processes of one jax.distributed job on 127.0.0.1 and collect their output.

Each process runs ``script`` with ``JAX_PLATFORMS=cpu`` and 2 CPU devices. With ``initialize``
(the default) a preamble first calls ``jax.distributed.initialize`` on a free loopback port, so
the script can use JAX at once; without it the script initialises JAX itself from its arguments
(``args(index, port)``) or from the variables ``MP_PORT``, ``MP_INDEX`` and ``MP_COUNT``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PREAMBLE = textwrap.dedent(
    """
    import os
    import jax
    _port, _index = os.environ["MP_PORT"], int(os.environ["MP_INDEX"])
    _count = int(os.environ["MP_COUNT"])
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{_port}",
        coordinator_bind_address=f"127.0.0.1:{_port}",
        num_processes=_count,
        process_id=_index,
        heartbeat_timeout_seconds=int(os.environ["MP_HEARTBEAT_S"]),
        shutdown_timeout_seconds=int(os.environ["MP_SHUTDOWN_S"]),
    )
    """
)


@dataclass
class Result:
    """What one process left behind."""

    index: int
    returncode: int | None  # None: it was still running at the timeout and was killed
    stdout: str
    stderr: str

    def describe(self) -> str:
        """A short text for assertion messages: the return code and the tails of the output."""
        return (
            f"process {self.index} rc={self.returncode}\n--- stdout\n{self.stdout[-2000:]}"
            f"\n--- stderr\n{self.stderr[-3000:]}"
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hostname_is_loopback() -> bool:
    """Whether this host's name resolves to a loopback address: gloo, JAX's CPU collectives,
    binds the address of ``gethostname()``, and tests must never send traffic beyond loopback."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(socket.gethostname())).is_loopback
    except (OSError, ValueError):
        return False


def run(
    script: str,
    count: int = 2,
    args: Callable[[int, int], Sequence[str]] | None = None,
    *,
    initialize: bool = True,
    timeout_s: float = 60.0,
    heartbeat_s: int = 60,
    shutdown_s: int = 120,
    env: dict[str, str] | None = None,
) -> list[Result]:
    """Run ``script`` in ``count`` processes of one job and wait for all of them.

    Args:
        script: Python source; with ``initialize`` it runs after ``jax.distributed.initialize``.
        count: how many processes.
        args: ``args(index, port)`` gives each process's ``sys.argv[1:]``.
        initialize: prepend the preamble that initialises ``jax.distributed``.
        timeout_s: processes still running this long after the start are killed
            (``returncode`` None).
        heartbeat_s: JAX's heartbeat timeout: a survivor is aborted this long after a peer died.
        shutdown_s: how long JAX's shutdown at exit waits for the other processes.
        env: extra environment variables.
    """
    if initialize and not hostname_is_loopback():  # a script of its own decides for itself
        raise RuntimeError(
            f"hostname {socket.gethostname()!r} does not resolve to a loopback address; gloo "
            "would listen beyond 127.0.0.1: map it to 127.0.0.1 in /etc/hosts to run these tests"
        )
    port = free_port()
    source = (PREAMBLE if initialize else "") + textwrap.dedent(script)
    base = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "MP_PORT": str(port),
        "MP_COUNT": str(count),
        "MP_HEARTBEAT_S": str(heartbeat_s),
        "MP_SHUTDOWN_S": str(shutdown_s),
        **(env or {}),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", source, *(args(i, port) if args else ())],
            env={**base, "MP_INDEX": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    results = []
    deadline = time.monotonic() + timeout_s
    try:
        for i, p in enumerate(procs):
            try:
                out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
                results.append(Result(i, p.returncode, out, err))
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                results.append(Result(i, None, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results
