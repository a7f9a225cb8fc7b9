"""A forged checkpoint: the template the fuzz campaign mutates, how a forger re-seals it, and
every reader that must refuse what it cannot trust.

The checksums (the manifest's, kept in _CHECKPOINT_METADATA, and the metadata's own) are
recomputed as stepsafe's writer computes them, so that only validation stands between a forged
document and a reader. ``make_template`` checks that this still matches the writer.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stress.states import Counter, make_state

STEP = 5
META = "_CHECKPOINT_METADATA"


# -- the template checkpoint and how a forger seals it ---------------------------------------
def make_template(root: Path) -> Path:
    from stepsafe.manager.manager import CheckpointManager, ManagerOptions

    opts = ManagerOptions(async_save=False, data_file_size_bytes=4096)
    mgr = CheckpointManager(str(root / "run" / "checkpoints"), opts)
    mgr.save(STEP, make_state(STEP, 16 << 10), data_iterator=Counter(3), force=True)
    step = Path(mgr.step_path(STEP))
    doc = json.loads((step / META).read_bytes())
    if seal_metadata(dict(doc))["checksum"] != doc["checksum"]:
        raise RuntimeError("the harness no longer reproduces the metadata checksum: update seal")
    return step


def seal_metadata(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with its own checksum recomputed, as stepsafe's writer computes it."""
    from stepsafe.format.checksum import checksum

    doc.pop("checksum", None)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return doc | {"checksum": checksum(canonical)}


def manifest_of(step: Path) -> Path:
    return next((step / "items").glob("manifest.*.json"))


def write_sealed(step: Path, manifest: Any | None = None, meta: Any | None = None) -> None:
    """Replace the manifest and/or the metadata, checksums recomputed where they can be."""
    from stepsafe.format.checksum import checksum

    meta_doc = json.loads((step / META).read_bytes()) if meta is None else meta
    if manifest is not None:
        raw = json.dumps(manifest).encode()
        manifest_of(step).write_bytes(raw)
        if isinstance(meta_doc, dict):
            meta_doc["manifest_checksum"] = checksum(raw)
    if isinstance(meta_doc, dict):
        meta_doc = seal_metadata(meta_doc)
    (step / META).write_bytes(json.dumps(meta_doc).encode())


# -- the readers -----------------------------------------------------------------------------
def readers(step: Path) -> list[tuple[str, Callable[[], Any]]]:
    import stepsafe
    from stepsafe.cli.main import main as cli

    run = str(step.parent.parent)
    return [
        ("restore", lambda: stepsafe.restore(str(step))),
        ("restore(verify=False)", lambda: stepsafe.restore(str(step), verify=False)),
        ("verify", lambda: stepsafe.verify(str(step))),
        ("metadata", lambda: stepsafe.metadata(str(step))),
        ("info", lambda: stepsafe.info(str(step))),
        ("manager start", lambda: start_and_resume(str(step.parent))),
        ("ls", lambda: cli(["ls", run])),
        ("inspect", lambda: cli(["inspect", str(step)])),
        ("gc --dry-run", lambda: cli(["gc", run, "--keep", "1", "--dry-run"])),
    ]


def start_and_resume(directory: str) -> None:
    """What a trainer does first: a manager on the run, then restore the latest step."""
    from stepsafe.manager.manager import CheckpointManager

    with CheckpointManager(directory) as mgr:
        mgr.restore(data_iterator=Counter())


def read_all(step: Path, case: str) -> list[str]:
    """Run every reader; the ones that failed with anything but a StepsafeError."""
    from stepsafe import StepsafeError

    bad = []
    for name, call in readers(step):
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                call()
        except StepsafeError:
            pass
        except BaseException as e:  # MemoryError, RecursionError, KeyboardInterrupt-free world
            bad.append(f"{case}: {name} raised {type(e).__name__}: {str(e)[:200]}")
    return bad
