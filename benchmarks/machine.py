"""The machine, the package versions and the stepsafe code a run was taken on, for the results'
header; and how a run finishes (raw JSON, then markdown)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
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
    Path(results).parent.mkdir(parents=True, exist_ok=True)
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


def snapshot_head(out: Path) -> dict[str, str]:
    """Export ``src/stepsafe`` as committed at HEAD under ``out`` and put it first on the
    children's ``PYTHONPATH``: another engineer's edits (or commits) during a run of half an
    hour then cannot mix versions of stepsafe in one table."""
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dest = out / f"stepsafe-{commit}"
    if not (dest / "src" / "stepsafe").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", "HEAD", "src/stepsafe"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    src = str(dest / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path.insert(0, src)
    info = stepsafe_source()
    info["commit"] = f"{commit} (HEAD, snapshot: working-tree edits excluded)"
    return info
