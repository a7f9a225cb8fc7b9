"""The machine and package versions a run was taken on, for the results' header."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "stepsafe",
    "numpy",
    "xxhash",
    "torch",
    "safetensors",
    "jax",
    "jaxlib",
    "orbax-checkpoint",
    "tensorstore",
)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def _disk(path: str) -> str:
    """Device, file system and mount options of the file system holding ``path``."""
    best = ("?", "?", "?", "")
    real = os.path.realpath(path)
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fs, opts, *_ = line.split()
        if real.startswith(mnt) and len(mnt) >= len(best[3]):
            best = (dev, fs, opts, mnt)
    dev, fs, opts, mnt = best
    rot = Path(f"/sys/block/{os.path.basename(dev)}/queue/rotational")
    flag = rot.read_text().strip() if rot.exists() else "?"
    return f"{dev} (rotational={flag}) {fs} on {mnt}, {opts}"


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe(scratch: str) -> dict[str, str]:
    return {
        "cpu": _cpu(),
        "cores": str(os.cpu_count()),
        "ram": f"{_ram_gib():.1f} GiB",
        "disk": _disk(scratch),
        "kernel": platform.release(),
    }


def finish_run(
    run: dict,
    json_path: Path,
    results: str,
    render: Callable[[dict], str],
    *,
    source_may_change: bool,
) -> None:
    """Write a run's raw JSON and its markdown (``render(run)``), noting first in the run when
    stepsafe's code changed under it (``source_may_change``: the working tree was measured,
    not a frozen snapshot)."""
    end = stepsafe_source()
    if source_may_change and end != run["stepsafe_source"]:
        run["stepsafe_source_at_end"] = end
        print("WARNING: stepsafe's code changed during the run; results mix versions")
    json_path.write_text(json.dumps(run, indent=1))
    Path(results).write_text(render(run))
    print(f"raw JSON: {json_path}\nresults: {results}")


def stepsafe_source() -> dict[str, str]:
    """Where the children import stepsafe from, its git commit, and a hash of its code.

    Hashed at the start and the end of a run: an editable install picks up edits made while
    a run goes on, which would mix versions of stepsafe in one table.
    """
    spec = importlib.util.find_spec("stepsafe")
    if spec is None or spec.origin is None:
        return {"path": "not found"}
    pkg = Path(spec.origin).parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes())
    git = subprocess.run(
        ["git", "-C", str(pkg), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {"path": str(pkg), "commit": git.stdout.strip() or "?", "hash": h.hexdigest()[:16]}
