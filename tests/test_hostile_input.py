"""Checkpoints built to hurt the reader: every read is bounded, nothing blocks, nothing is
read through a link, nothing huge is allocated on a manifest's word, and failures say where.

- A FIFO, a link to ``/dev/zero``, a link out of the checkpoint or a huge file in place of the
  metadata, the manifest, a data file or ``items/``: every command and library call that meets
  it ends (each runs in a subprocess with a timeout, so a regression fails instead of hanging
  the suite) with a one-line CorruptCheckpointError-family error naming the path.
- A forged manifest (its checksum recomputed into the metadata, so that only the parser can
  stop it) with a chunk bigger than any writer writes is a ManifestError; one claiming an
  8 GiB array over a sparse 8 GiB file with wrong checksums stops after a few chunks.
- The shard exact-cover check is near-linear in the number of shards (counted comparisons).
- A write that fails (a file size limit here, ENOSPC alike) names the checkpoint and file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BUCKET_KINDS
from hypothesis import given, settings
from hypothesis import strategies as st

import stepsafe
from stepsafe import CorruptCheckpointError, ManifestError
from stepsafe.format import CommitRecord, read_extra, write_checkpoint
from stepsafe.format.checksum import checksum
from stepsafe.format.layout import COMMIT_RECORD_MAX_BYTES
from stepsafe.format.manifest import (
    MANIFEST_MAX_BYTES,
    MAX_CHUNK,
    Manifest,
    Shard,
    check_exact_cover,
)
from stepsafe.storage import LocalStorage, storage_for

METADATA = "_CHECKPOINT_METADATA"
REPO = Path(__file__).resolve().parent.parent
STEPSAFE_CLI = Path(sys.executable).parent / "stepsafe"
TIMEOUT_S = 90  # generous under load; a blocked read never ends at all


def state() -> dict[str, Any]:
    return {"w": np.arange(3000, dtype=np.float32), "b": np.ones(7), "step": 3}


def make_run(root: Path) -> tuple[Path, Path]:
    """A run with two committed steps (several data files each); returns (run, step 2)."""
    run = root / "run"
    for step in (1, 2):
        stepsafe.save(run / "checkpoints" / str(step), state(), data_file_size_bytes=4096)
    return run, run / "checkpoints" / "2"


def metadata_of(step_dir: Path) -> CommitRecord:
    return CommitRecord.from_json((step_dir / METADATA).read_bytes(), "")


def manifest_of(step_dir: Path) -> Path:
    return step_dir / metadata_of(step_dir).manifest_path


def data_file_of(step_dir: Path) -> Path:
    return sorted((step_dir / "items").glob("process_*.data"))[0]


def seal(step_dir: Path, raw: bytes) -> None:
    """Write ``raw`` as the manifest and its checksum into the metadata, as a forger would."""
    manifest_of(step_dir).write_bytes(raw)
    meta = metadata_of(step_dir)
    meta.manifest_checksum = checksum(raw)
    (step_dir / METADATA).write_bytes(meta.to_json())


def replace(path: Path, make: Callable[[Path], None]) -> Path:
    path.unlink()
    make(path)
    return path


def sparse(size: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        with open(path, "wb") as f:
            f.truncate(size)

    return make


def link_to(target: Path | str) -> Callable[[Path], None]:
    return lambda path: path.symlink_to(target)


def link_out(step_dir: Path, path: Path) -> Path:
    """Replace ``path`` (a file or directory of the step) by a link to a copy of it outside
    the checkpoint, with the same bytes: following the link would even pass every checksum."""
    outside = step_dir.parents[2] / "outside" / path.name
    outside.parent.mkdir(exist_ok=True)
    if path.is_dir():
        shutil.copytree(path, outside)
        shutil.rmtree(path)
    else:
        shutil.copyfile(path, outside)
        path.unlink()
    path.symlink_to(outside)
    return path


# name -> sabotage(step dir) -> the path the errors must name
SCENARIOS: dict[str, Callable[[Path], Path]] = {
    "fifo-metadata": lambda s: replace(s / METADATA, os.mkfifo),
    "fifo-manifest": lambda s: replace(manifest_of(s), os.mkfifo),
    "fifo-data": lambda s: replace(data_file_of(s), os.mkfifo),
    "dev-zero-metadata": lambda s: replace(s / METADATA, link_to("/dev/zero")),
    "dev-zero-manifest": lambda s: replace(manifest_of(s), link_to("/dev/zero")),
    "huge-metadata": lambda s: replace(s / METADATA, sparse(2 << 30)),
    "huge-manifest": lambda s: replace(manifest_of(s), sparse(MANIFEST_MAX_BYTES + 1)),
    "data-linked-out": lambda s: link_out(s, data_file_of(s)),
    "items-linked-out": lambda s: link_out(s, s / "items"),
}
SMALL_FILES = {k for k in SCENARIOS if "metadata" in k or "manifest" in k or "items" in k}
OPS = [
    "cli-ls", "cli-inspect", "cli-gc", "cli-verify",
    "metadata", "restore", "restore-unverified", "verify", "manager",
]  # fmt: skip
READS_SMALL_FILES = {"cli-inspect", "cli-verify", "metadata", "restore", "restore-unverified",
                     "verify"}  # fmt: skip
READS_DATA = {"cli-verify", "restore", "restore-unverified", "verify"}


# ------------------------------------------------------------------ the worker subprocess


def _cli(argv: list[str]) -> dict[str, Any]:
    from stepsafe.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


def _op(op: str, run: str, step: str) -> dict[str, Any]:
    if op == "cli-ls":
        return _cli(["ls", run])
    if op == "cli-inspect":
        return _cli(["inspect", step])
    if op == "cli-gc":
        return _cli(["gc", run, "--keep", "1", "--dry-run"])
    if op == "cli-verify":
        return _cli(["verify", step, "--json", "--no-progress"])
    if op == "metadata":
        stepsafe.metadata(step)
    elif op == "restore":
        stepsafe.restore(step)
    elif op == "restore-unverified":
        stepsafe.restore(step, verify=False)
    elif op == "verify":
        report = stepsafe.verify(step)
        return {"ok": report.ok, "problems": [f"{p.file}: {p.message}" for p in report.problems]}
    elif op == "manager":
        from stepsafe.manager.loading import load_initial_state
        from stepsafe.manager.manager import CheckpointManager, ManagerOptions

        with CheckpointManager(f"{run}/checkpoints", ManagerOptions(async_save=False)) as m:
            load_initial_state(m, state())
    return {"ok": True}


def worker(run: str, step: str) -> None:
    """Run every op, one JSON line each as it ends: a hang shows as the op never printed."""
    for op in OPS:
        try:
            result = _op(op, run, step)
        except Exception as e:
            result = {
                "error": type(e).__name__,
                "stepsafe": isinstance(e, stepsafe.StepsafeError),
                "corrupt": isinstance(e, CorruptCheckpointError),
                "message": str(e),
            }
        print(json.dumps({"op": op, **result}), flush=True)


def run_worker(run: Path, step: Path) -> dict[str, dict[str, Any]]:
    cmd = [sys.executable, __file__, "worker", str(run), str(step)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        done = [json.loads(line)["op"] for line in (e.stdout or b"").decode().splitlines()]
        hung = OPS[len(done)] if len(done) < len(OPS) else "?"
        pytest.fail(f"{hung!r} did not end within {TIMEOUT_S} s (finished: {done})")
    assert p.returncode == 0, p.stderr[-3000:]
    return {r["op"]: r for r in map(json.loads, p.stdout.splitlines())}


# ------------------------------------------------------------------ FIFOs, links, huge files


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_hostile_file_never_hangs_and_is_named(tmp_path, scenario):
    run, step = make_run(tmp_path)
    bad = str(SCENARIOS[scenario](step))
    results = run_worker(run, step)
    must_fail = READS_SMALL_FILES if scenario in SMALL_FILES else READS_DATA
    for op, r in results.items():
        text = json.dumps(r)
        assert "Traceback" not in text, (op, text)
        assert r.get("error") is None or r["stepsafe"], (op, r)  # only stepsafe's errors
        if op.startswith("cli-"):
            errors = [ln for ln in r["stderr"].splitlines() if ln.startswith("stepsafe: error:")]
            assert len(errors) <= 1, (op, r["stderr"])
            if op in must_fail:
                assert r["rc"] != 0, (op, r)
                assert bad in r["stderr"] + r["stdout"], (op, bad, r)
        elif op == "verify":
            assert not r.get("ok") and bad in text, (op, bad, r)
        elif op in must_fail:
            assert r.get("corrupt"), (op, r)
            assert bad in r["message"], (op, bad, r)
    if scenario.startswith("huge"):
        assert "more than the" in results["metadata"]["message"]  # refused unread


def test_real_cli_on_a_fifo_metadata_prints_one_line(tmp_path):
    """The installed command: every one ends without a traceback; those that must read the
    step fail with one line. (``ls`` and ``gc`` may list the step as damaged instead.)"""
    run, step = make_run(tmp_path)
    bad = str(SCENARIOS["fifo-metadata"](step))
    for argv in (["inspect", str(step)], ["verify", str(step)], ["ls", str(run)],
                 ["gc", str(run), "--keep", "1", "--dry-run"]):  # fmt: skip
        try:
            p = subprocess.run(
                [str(STEPSAFE_CLI), *argv], capture_output=True, text=True, timeout=TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"stepsafe {' '.join(argv)} hangs on a FIFO")
        assert "Traceback" not in p.stderr, p.stderr
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("stepsafe: error:")]
        assert len(errors) <= 1, p.stderr
        if argv[0] in ("inspect", "verify"):
            assert p.returncode != 0 and errors, (argv, p.stderr)
            assert bad in p.stdout + p.stderr and "FIFO" in p.stdout + p.stderr


def test_extra_file_behind_a_linked_directory_is_refused(tmp_path):
    """Directories on the way to any file of a step are checked, not only ``items/``."""
    step = tmp_path / "ckpt" / "1"
    meta = CommitRecord(step=1)
    write_checkpoint(LocalStorage(), str(step), ["dict", [], []], [], {}, record=meta,
                     extra_files={"iter/process_0.json": b"{}"})  # fmt: skip
    storage = LocalStorage()
    assert read_extra(storage, str(step), "iter/process_0.json") == b"{}"
    link_out(step, step / "iter")
    with pytest.raises(CorruptCheckpointError, match=f"{step / 'iter'} is a symbolic link"):
        read_extra(storage, str(step), "iter/process_0.json")


@pytest.mark.parametrize("bucket_url", BUCKET_KINDS, indirect=True)
def test_buckets_read_small_files_with_a_limit(bucket_url):
    """One ranged GET of at most ``limit + 1`` bytes: a huge object is refused unread."""
    storage, root = storage_for(bucket_url)
    storage.fs.pipe_file(storage.join(root, "big"), b"x" * 100)
    storage.fs.pipe_file(storage.join(root, "empty"), b"")
    assert storage.read_bytes(storage.join(root, "big"), 100) == b"x" * 100
    assert storage.read_bytes(storage.join(root, "empty"), 100) == b""
    with pytest.raises(CorruptCheckpointError, match="more than the 99 bytes"):
        storage.read_bytes(storage.join(root, "big"), 99)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "absent"), 99)


def test_metadata_and_manifest_limits_fit_what_writers_write():
    """A writer refuses to write what readers refuse to read."""
    huge = CommitRecord(step=1, custom_metadata={"x": "y" * COMMIT_RECORD_MAX_BYTES})
    with pytest.raises(stepsafe.UnsupportedLeafError, match="metadata"):
        huge.to_json()


# ------------------------------------------------------------------ sizes before allocations


def _forge(
    step_dir: Path, shape: list[int], chunks: list[list], file_size: int, real_size: int
) -> str:
    """Replace the manifest by one array ``x`` of float32 ``shape`` in one data file that it
    says holds ``file_size`` bytes, sealed, and make that file ``real_size`` bytes of zeros
    (sparse); returns the data file's path."""
    data = data_file_of(step_dir)
    for other in (step_dir / "items").glob("process_*.data"):
        other.unlink()
    with open(data, "wb") as f:
        f.truncate(real_size)
    doc = json.loads(manifest_of(step_dir).read_bytes())
    doc.update(
        structure=["dict", ["x"], [["leaf"]]],
        values={},
        files={data.name: file_size},
        arrays={"x": {"dtype": "<f4", "shape": shape, "shards": [
            {"index": [[0, n] for n in shape], "chunks": [[data.name, *c] for c in chunks]}]}},
    )  # fmt: skip
    seal(step_dir, json.dumps(doc).encode())
    return str(data)


def test_chunk_larger_than_any_writer_writes_is_a_manifest_error(tmp_path):
    _, step = make_run(tmp_path)
    n = 10**15  # 4e15 bytes: allocating it first was a MemoryError traceback in verify
    _forge(step, [n], [[0, 4 * n, "0" * 16]], 4 * n, 4096)
    for call in (stepsafe.metadata, stepsafe.restore, stepsafe.info):
        with pytest.raises(ManifestError, match=f"more than the {MAX_CHUNK} bytes"):
            call(step)
    report = stepsafe.verify(step)
    assert not report.ok and "more than the" in report.problems[0].message


def test_chunks_claiming_more_bytes_than_their_file_holds(tmp_path):
    """Every chunk within the file, but together more than it: one small file backing a big
    array (its chunks overlap) would make restore allocate the array first."""
    _, step = make_run(tmp_path)
    _forge(step, [MAX_CHUNK], [[0, MAX_CHUNK, "0" * 16]] * 4, MAX_CHUNK, MAX_CHUNK)
    with pytest.raises(ManifestError, match=r"chunks claim \d+ bytes of process_"):
        stepsafe.metadata(step)


MEASURE = """
import resource, sys, stepsafe
try:
    stepsafe.restore(sys.argv[1])
    print("restored")
except stepsafe.StepsafeError as e:
    print(type(e).__name__, str(e)[:200])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_sparse_8gib_array_with_bad_checksums_stops_reading_early(tmp_path):
    """A sealed manifest claims an 8 GiB array in 128 chunks of 64 MiB, backed by a sparse
    8 GiB file, with checksums that do not match: restore stops after the first chunks that
    fail rather than filling 8 GiB first. Peak RSS of the restoring process: 487 MiB quiet,
    1.5 GiB under load (the chunks already in flight on the I/O threads); before, every chunk
    was read first."""
    _, step = make_run(tmp_path)
    size = 8 << 30
    chunks = [[off, MAX_CHUNK, "0123456789abcdef"] for off in range(0, size, MAX_CHUNK)]
    data = _forge(step, [size // 4], chunks, size, size)
    p = subprocess.run(
        [sys.executable, "-c", MEASURE, str(step)],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    outcome, peak = p.stdout.splitlines()
    assert outcome.startswith("ChecksumMismatchError") and data in outcome, outcome
    # Bounded by the chunks the 8 I/O threads started before the first failure was seen:
    # 0.5 GiB on a quiet machine, 1.5 GiB measured under load; reading all would be 8 GiB.
    assert int(peak) < 3 << 30, f"peak RSS {int(peak) >> 20} MiB"


# ------------------------------------------------------------------ exact cover, near-linear


class Counted(int):
    """An int that counts the comparisons and hashes made of it: the work of a check."""

    ops = 0

    def __eq__(self, other: object) -> bool:
        Counted.ops += 1
        return int(self) == int(other)  # type: ignore[call-overload]

    def __lt__(self, other: int) -> bool:
        Counted.ops += 1
        return int(self) < int(other)

    def __hash__(self) -> int:
        Counted.ops += 1
        return int.__hash__(self)


@pytest.mark.parametrize("shape", [(3000,), (60, 50)], ids=["rows", "grid"])
def test_exact_cover_work_grows_near_linearly(shape):
    """3000 shards of one element each: the old check did ~n^2/2 comparisons (list.index per
    boundary: 23 s for 40k shards), sorting once does ~n log n."""
    shards = [
        Shard(tuple((Counted(i), Counted(i + 1)) for i in idx), ()) for idx in np.ndindex(*shape)
    ]
    n = len(shards)
    Counted.ops = 0
    check_exact_cover("x", shape, shards)
    assert Counted.ops < 40 * n * math.log2(n) / 10, Counted.ops


def _grid_doc(rows: int, cols: int, drop: int | None = None, dup: int | None = None) -> bytes:
    shards = [
        {"index": [[i, i + 1], [j, j + 1]], "chunks": [["f.data", (i * cols + j) * 4, 4, "0"]]}
        for i in range(rows)
        for j in range(cols)
    ]
    if drop is not None:
        shards.pop(drop)
    if dup is not None:
        shards[dup] = dict(shards[dup + 1], chunks=[["f.data", dup * 4, 4, "0"]])
    return json.dumps({
        "format": "stepsafe", "format_version": 1, "checksum": "xxh3_64",
        "structure": ["dict", ["x"], [["leaf"]]], "values": {},
        "files": {"f.data": rows * cols * 4},
        "arrays": {"x": {"dtype": "<f4", "shape": [rows, cols], "shards": shards}},
    }).encode()  # fmt: skip


def test_40k_shards_validate_and_gaps_and_overlaps_are_still_refused():
    """Correctness at 40k shards; speed is what the counting test above checks. Measured on a
    loaded 2-core machine, whole manifest parse: 40,000 one-row shards 1.8 s (30 s before),
    200 x 200 shards 1.4 s (1.3 s before), of which the cover check is 0.2-0.3 s."""
    manifest = Manifest.from_json(_grid_doc(200, 200), "m")
    assert len(manifest.arrays["x"].shards) == 40_000
    with pytest.raises(ManifestError, match="gaps"):
        Manifest.from_json(_grid_doc(50, 50, drop=1234), "m")
    with pytest.raises(ManifestError, match="overlap"):
        Manifest.from_json(_grid_doc(50, 50, dup=777), "m")


def _boxes(*boxes: tuple[tuple[int, int], ...]) -> list[Shard]:
    return [Shard(b, ()) for b in boxes]


@pytest.mark.parametrize(
    ("boxes", "error"),
    [
        # rows cut differently: not a grid, an exact cover all the same
        (_boxes(((0, 2), (0, 4)), ((2, 4), (0, 1)), ((2, 4), (1, 4))), None),
        (_boxes(((0, 4), (0, 2)), ((0, 1), (2, 4)), ((1, 4), (2, 4))), None),
        # same total volume, but two boxes overlap and a cell is left out
        (_boxes(((0, 2), (0, 4)), ((1, 3), (0, 4)), ((3, 4), (0, 2)), ((2, 3), (0, 0))),
         "overlap|gaps"),
        (_boxes(((0, 2), (0, 4)), ((2, 4), (0, 2)), ((2, 4), (1, 3))), "overlap|gaps"),
        (_boxes(((0, 2), (0, 4)), ((2, 4), (0, 3))), "gaps"),
        (_boxes(((0, 4), (0, 4)), ((1, 2), (1, 2))), "overlap"),
    ],
)  # fmt: skip
def test_irregular_layouts(boxes, error):
    if error is None:
        check_exact_cover("x", (4, 4), boxes)
    else:
        with pytest.raises(ManifestError, match=error):
            check_exact_cover("x", (4, 4), boxes)


@st.composite
def _layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], list[Shard]]:
    """Small arrays cut into boxes: often an exact grid or an exact irregular tiling, then
    perhaps a box dropped, duplicated, grown or shrunk."""
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    boxes = [tuple((0, n) for n in shape)]
    for _ in range(draw(st.integers(0, 6))):  # split random boxes along random axes
        box = boxes.pop(draw(st.integers(0, len(boxes) - 1)))
        axis = draw(st.integers(0, len(shape) - 1))
        lo, hi = box[axis]
        if hi - lo < 2:
            boxes.append(box)
            continue
        cut = draw(st.integers(lo + 1, hi - 1))
        boxes += [(*box[:axis], (lo, cut), *box[axis + 1 :]),
                  (*box[:axis], (cut, hi), *box[axis + 1 :])]  # fmt: skip
    damage = draw(st.sampled_from(["none", "drop", "dup", "resize"]))
    i = draw(st.integers(0, len(boxes) - 1))
    if damage == "drop":
        boxes.pop(i)
    elif damage == "dup":
        boxes.append(boxes[i])
    elif damage == "resize":
        axis = draw(st.integers(0, len(shape) - 1))
        lo, hi = boxes[i][axis]
        new = (draw(st.integers(0, lo)), draw(st.integers(hi, shape[axis])))
        boxes[i] = (*boxes[i][:axis], new, *boxes[i][axis + 1 :])
    return shape, [Shard(b, ()) for b in draw(st.permutations(boxes))]


@settings(max_examples=300, deadline=None)
@given(_layouts())
def test_exact_cover_agrees_with_counting_every_element(layout):
    shape, shards = layout
    counts = np.zeros(shape, np.int64)
    for s in shards:
        counts[s.slices] += 1
    exact = bool((counts == 1).all())
    try:
        check_exact_cover("x", shape, shards)
        verdict = True
    except ManifestError:
        verdict = False
    assert verdict == exact, (shape, [s.index for s in shards])


# ------------------------------------------------------------------ a write that fails


FILL = """
import os, resource, signal, sys
import numpy as np
import stepsafe
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    stepsafe.save(sys.argv[1], {"a": np.ones(1 << 20)})  # 8 MiB: over the 1 MiB limit
except Exception as e:
    print(type(e).__name__, isinstance(e, stepsafe.StepsafeError), isinstance(e, OSError),
          getattr(e, "errno", None))
    print(e)
"""


def test_a_failed_write_names_the_checkpoint_and_leaves_nothing(tmp_path):
    target = tmp_path / "ckpt" / "5"
    p = subprocess.run(
        [sys.executable, "-c", FILL, str(target)], capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    kind, message = p.stdout.splitlines()
    assert kind == "StorageError True True 27", p.stdout  # EFBIG; ENOSPC takes the same path
    assert str(target) in message and "File too large" in message and ".data" in message
    assert list((tmp_path / "ckpt").iterdir()) == []  # no step, no temporary


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(*sys.argv[2:4])
