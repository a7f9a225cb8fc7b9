"""Hostile files inside a committed step: FIFOs, links to /dev/zero and out of the step, chunks
claiming more bytes than any writer writes (one a sparse 8 GiB file, consistent otherwise).

Each case runs every reader of forged.py; one that hangs is killed by the fuzz campaign's
watchdog, one that allocates what the file claims dies under the child's memory limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from stress.child import say
from stress.forged import META, STEP, manifest_of, read_all, write_sealed


def hostile_cases() -> list[str]:
    kinds = ["fifo-metadata", "fifo-manifest", "fifo-data", "devzero-metadata"]
    return [*kinds, "devzero-manifest", "symlink-data-outside", "huge-chunk", "sparse-8GiB-chunk"]


def child_hostile(template: str, work: str, cases: list[str]) -> None:
    """Fixed hostile cases, in order; a reader that returns data read through a symlink out of
    the step, or anything but a StepsafeError, is a failure."""
    for case in cases:
        say("case", case)
        hostile_case(template, work, case)
    say("end")


def hostile_case(template: str, work: str, case: str) -> None:
    import stepsafe

    root = Path(work)
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(Path(template).parent.parent.parent, root)
    step = root / "run" / "checkpoints" / str(STEP)
    data_file = sorted((step / "items").glob("*.data"))[0]
    manifest = json.loads(manifest_of(step).read_bytes())
    kind, _, target = case.partition("-")
    path = {"metadata": step / META, "manifest": manifest_of(step)}.get(target, data_file)
    if kind in ("fifo", "devzero"):
        path.unlink()
        os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")
    elif case == "symlink-data-outside":
        outside = root / "outside.data"
        outside.write_bytes(data_file.read_bytes())
        data_file.unlink()
        data_file.symlink_to(outside)
    else:
        length = 4 * 10**15 if case == "huge-chunk" else 8 << 30
        # A file of its own, consistent with everything else: only the size is hostile.
        entry = manifest["arrays"]["params/layer_0"]  # float32 (states.DTYPES[0])
        name = data_file.name.replace(".00000.", ".00099.")
        entry["shape"] = [length // 4]
        entry["shards"] = [{"index": [[0, length // 4]], "chunks": [[name, 0, length, "0" * 16]]}]
        manifest["files"][name] = length
        with open(step / "items" / name, "wb") as f:
            f.truncate(min(length, 8 << 30))  # sparse: no disk used
        write_sealed(step, manifest=manifest)
    for problem in read_all(step, case):
        say("fail", problem)
    if case == "symlink-data-outside":
        with contextlib.suppress(stepsafe.StepsafeError):
            stepsafe.restore(str(step), verify=False)
            say("fail", f"{case}: restore(verify=False) read a file out of the step via a link")
