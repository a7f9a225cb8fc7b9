"""Whose local directory this is: one run's, one process's, never the persistent tier's.

A local step names neither its run nor its job: only the directory it lies in says whose it is.
So before a run uses a local directory it checks, and records, that the directory is its own:

- not the persistent tier's directory, nor inside it or around it (local retention would
  delete persistent steps);
- claimed by this run: ``_LOCAL_TIER.json`` names the persistent directory of the run that
  first used it; another run (the same ``run_name`` under another ``base_output_directory``)
  is refused rather than resumed from a stranger's weights;
- not shared with another process of the job on the same host (their shards would mix).
"""

from __future__ import annotations

import json
import os
import socket

from stepsafe.distributed import coordinator
from stepsafe.distributed.outcomes import as_error, failure
from stepsafe.errors import ConfigError

CLAIM_FILE = "_LOCAL_TIER.json"


def claim_local_directory(directory: str, persistent: str, tag: str) -> None:
    """Create ``directory`` (absolute, on a local disk) for the run whose persistent tier is
    ``persistent``, or check that it is that run's already.

    Raises:
        ConfigError: ``directory`` overlaps ``persistent``, is another run's, cannot be made
            (a file in the way), or another process of the job uses it on this host; under
            several processes, on every process (the first one's error).
    """
    error: ConfigError | None = None
    try:
        _refuse_overlap(directory, persistent)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"local checkpoint directory {directory} cannot be made: {e.strerror or e} (a "
                "file in the way?); point local_checkpoint_directory at a directory"
            ) from e
        _claim(directory, persistent)
    except ConfigError as e:
        error = e
    _refuse_shared(directory, tag, error)


def _refuse_overlap(directory: str, persistent: str) -> None:
    if "://" in persistent:
        return
    local, other = os.path.realpath(directory), os.path.realpath(persistent)
    if local == other or local.startswith(other + os.sep) or other.startswith(local + os.sep):
        raise ConfigError(
            f"local checkpoint directory {directory} overlaps the persistent tier {persistent}: "
            "local retention would delete persistent steps; give the local tier a directory "
            "of its own (e.g. a disk of the host outside base_output_directory)"
        )


def _claim(directory: str, persistent: str) -> None:
    path = os.path.join(directory, CLAIM_FILE)
    try:
        with open(path, "rb") as f:
            owner = json.loads(f.read(1 << 16)).get("persistent")
    except FileNotFoundError:
        owner = None
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(
            f"{path} is unreadable ({e}): it says which run owns this local directory; move "
            "the directory aside, or delete that file if the directory is this run's"
        ) from e
    if owner is not None and owner != persistent:
        raise ConfigError(
            f"local checkpoint directory {directory} belongs to the run whose persistent tier "
            f"is {owner}, not {persistent}: its steps are not this run's; give this run its "
            "own local_checkpoint_directory (or run_name), or move that directory aside"
        )
    if owner is None:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"persistent": persistent}, f)
        os.replace(tmp, path)


def _refuse_shared(directory: str, tag: str, error: ConfigError | None) -> None:
    """Two processes on one host writing one local directory would mix their shards; and one
    process's ``error`` is every process's (none may go on to wait for the others)."""
    c = coordinator()
    if c.count == 1:
        if error is not None:
            raise error
        return
    mine = {
        "where": [socket.gethostname(), os.path.realpath(directory)],
        "error": None if error is None else failure(error, c.index),
    }
    docs = [json.loads(v) for v in c.all_gather(f"local-dir-{tag}", json.dumps(mine).encode())]
    if error is not None:
        raise error
    first = next((d["error"] for d in docs if d["error"] is not None), None)
    if first is not None:
        raise as_error(first, c.count)
    seen = [tuple(d["where"]) for d in docs]
    for p, where in enumerate(seen):
        if where == seen[c.index] and p != c.index:
            raise ConfigError(
                f"processes {min(p, c.index)} and {max(p, c.index)} both use local checkpoint "
                f"directory {where[1]} on host {where[0]}: each process needs its own (a "
                "per-host disk, or a directory per process)"
            )
