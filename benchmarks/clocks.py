"""The clocks a case is measured against, read before and after it in the orchestrator.

The machine's busy and stolen CPU, this process's finished children (the case), the server
(on a bucket) and the wall clock. A case during which other processes (another benchmark, a
test suite) or the hypervisor took much CPU can then be told apart (the bucket report leaves
such cases out of its medians), and the server's share shows which side of the connection a
method keeps busy.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any


def _machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal): CPU seconds all cores have spent busy in this guest since boot (idle and
    iowait apart), and those the hypervisor gave to someone else (steal), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def now(server: Any | None) -> dict[str, float]:
    """Every clock now; ``server`` (a ``servers.Server``, or None) adds its CPU seconds."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, steal = _machine_cpu_seconds()
    return {
        "busy": busy,
        "steal": steal,
        "children": children.ru_utime + children.ru_stime,
        "server": server.cpu_seconds() if server is not None else 0.0,
        "wall": time.perf_counter(),
    }


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """A case's record fields: the server's CPU, the wall clock, steal, and the CPU that
    neither the case nor the server used (other processes on the machine)."""
    d = {k: after[k] - before[k] for k in before}
    return {
        "server_cpu_s": d["server"],
        "case_wall_s": d["wall"],
        "steal_s": d["steal"],
        "other_cpu_s": max(0.0, d["busy"] - d["children"] - d["server"]),
    }
