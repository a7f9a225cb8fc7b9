"""Campaign ``corrupt``: random byte flips and truncations in a committed checkpoint.

One checkpoint (many small data files, a manifest, _CHECKPOINT_METADATA, the iterator file) is
damaged one file at a time, then restored (with its iterator) and verified. The promise: a
restore never returns wrong data silently; it raises a StepsafeError, and for damage to a data
file the error names the file and an array that lies in the damaged bytes; ``verify`` reports
the same damage. A flip that changes nothing a reader sees (JSON whitespace in the metadata)
may pass: it is counted as harmless, not as detected.
"""

from __future__ import annotations

import json
import random
import traceback
from pathlib import Path

from stepsafe import StepsafeError, verify
from stepsafe.manager.manager import CheckpointManager, ManagerOptions
from stress import backends
from stress.report import Result
from stress.states import Counter, difference, make_state

NAME = "corrupt"
PROMISE = "every flip/truncation: StepsafeError (naming array+file for data), never wrong data"
TRIALS = {"short": 300, "full": 1000}
STEP, NBYTES, FILE_BYTES = 7, 96 << 10, 8 << 10
KINDS = ("data", "data", "data", "manifest", "metadata", "iterator")


def run(result: Result, trials: list[int]) -> None:
    root = backends.scratch() / "corrupt"
    mgr = CheckpointManager(str(root), ManagerOptions(async_save=False, max_to_keep=0,
                                                      data_file_size_bytes=FILE_BYTES))  # fmt: skip
    mgr.save(STEP, make_state(STEP, NBYTES), data_iterator=Counter(STEP), force=True)
    step_dir = Path(mgr.step_path(STEP))
    files = {p: p.read_bytes() for p in sorted(step_dir.rglob("*")) if p.is_file()}
    by_kind = {
        "data": [p for p in files if p.suffix == ".data"],
        "manifest": [p for p in files if p.name.startswith("manifest.")],
        "metadata": [p for p in files if p.name == "_CHECKPOINT_METADATA"],
        "iterator": [p for p in files if p.parent.name == "iter"],
    }
    assert all(by_kind.values()), f"unexpected checkpoint layout: {sorted(files)}"
    manifest = json.loads(files[by_kind["manifest"][0]])
    for trial in trials:
        rng = random.Random(trial)
        path = rng.choice(by_kind[rng.choice(KINDS)])
        original = files[path]
        damaged, what, hit = damage(rng, original)
        path.write_bytes(damaged)
        try:
            case = f"{what} in {path.relative_to(step_dir)}"
            for problem in check(result, mgr, step_dir, path, case, keys_at(manifest, path, hit)):
                result.fail(trial, f"{case}: {problem}")
        finally:
            path.write_bytes(original)
        result.trials += 1


def damage(rng: random.Random, data: bytes) -> tuple[bytes, str, tuple[int, int]]:
    """The damaged bytes, a description, and the byte range [lo, hi) it touched."""
    if rng.random() < 0.3 or len(data) < 2:
        cut = rng.randrange(len(data))
        return data[:cut], f"truncated to {cut} of {len(data)} bytes", (cut, len(data))
    out = bytearray(data)
    offsets = sorted(rng.sample(range(len(data)), min(len(data), rng.randint(1, 3))))
    for off in offsets:
        out[off] ^= rng.randint(1, 255)
    return bytes(out), f"bytes flipped at {offsets}", (offsets[0], offsets[-1] + 1)


def keys_at(manifest: dict, path: Path, hit: tuple[int, int]) -> set[str]:
    """Arrays with a chunk in ``path`` overlapping the damaged range."""
    keys = set()
    for key, entry in manifest.get("arrays", {}).items():
        for shard in entry["shards"]:
            for name, offset, length, _ in shard["chunks"]:
                if name == path.name and offset < hit[1] and hit[0] < offset + length:
                    keys.add(key)
    return keys


def check(result: Result, mgr: CheckpointManager, step_dir: Path, path: Path, case: str,
          keys: set[str]) -> list[str]:  # fmt: skip
    problems = []
    it = Counter()
    try:
        got = mgr.restore(STEP, data_iterator=it)
    except StepsafeError as e:
        caught: StepsafeError | None = e
    except Exception as e:
        return [f"restore raised {type(e).__name__}, not a StepsafeError: {e}"]
    else:
        caught = None
        wrong = difference(got, make_state(STEP, NBYTES))
        if wrong or it.position != STEP:
            result.damaging += 1
            return [f"restore returned WRONG data silently ({wrong or 'iterator position'})"]
    try:
        report_ok = verify(str(step_dir)).ok
    except StepsafeError:
        report_ok = False
    except Exception as e:
        traceback.print_exc()
        problems.append(f"verify raised {type(e).__name__}, not a StepsafeError: {e}")
        report_ok = False
    if caught is None:
        if not report_ok:
            result.count("restore exact, verify flags it")
        else:
            result.count("harmless")
        return problems
    result.damaging += 1
    result.detected += 1
    if report_ok:
        problems.append(f"restore raised {type(caught).__name__} but verify reports no problem")
    msg = str(caught)
    if path.suffix == ".data":
        if path.name not in msg:
            problems.append(f"the error does not name the file {path.name}: {msg}")
        if keys and not any(k in msg for k in keys):
            problems.append(f"the error names none of the arrays {sorted(keys)}: {msg}")
    result.count(type(caught).__name__)
    return problems
