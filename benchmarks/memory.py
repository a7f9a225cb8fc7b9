"""Peak memory of one operation in this process, apart from what the process held before it.

Linux lets a process reset its peak RSS (``echo 5 > /proc/self/clear_refs``), so the peak of a
save or restore is measured alone, not mixed with building the state or importing libraries.
"""

from __future__ import annotations

import resource


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss() -> int:
    """Resident bytes now."""
    return _status_kib("VmRSS") * 1024


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5\n")
        return True
    except OSError:
        return False


def peak() -> int:
    """Peak resident bytes since the last ``reset_peak`` (or since the process started)."""
    return _status_kib("VmHWM") * 1024


def maxrss() -> int:
    """``ru_maxrss`` of this process, in bytes: its peak over its whole life."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
