"""Every kind of damage gives its own, specific stepsafe exception, naming what is wrong.

Data bytes flipped -> ChecksumMismatchError (array key, file, offset); data files cut short or
gone -> TruncatedDataError; a manifest that is garbage, malformed, unsafe or from the future ->
ManifestError / UnsupportedFormatError (and nothing outside the checkpoint is read); a missing
commit marker, a temporary directory, a path with no checkpoint, a target or select that does
not fit, a leaf that cannot be saved, a save onto an existing checkpoint: each its own error.
Loading never imports or calls anything a manifest names.

Manifest corruption is tested twice: as damage (only the manifest changed: caught, whether by
a checksum or by the parser) and as a crafted file that is "sealed" (the checksum of the
manifest in _CHECKPOINT_METADATA, where the format keeps one, rewritten to match), which only
the parser's own validation can stop.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trees import assert_bit_exact

import stepsafe
from stepsafe import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    ManifestError,
    StepsafeError,
    TargetMismatchError,
    TruncatedDataError,
    UnsupportedFormatError,
    UnsupportedLeafError,
)
from stepsafe.format import CommitRecord
from stepsafe.format.checksum import checksum
from stepsafe.storage.local import LocalStorage

FILE_SIZE = 4096  # small data files, so that one state spreads over several of them
METADATA = "_CHECKPOINT_METADATA"


def make_state() -> dict[str, Any]:
    rng = np.random.default_rng(1234)
    return {
        "params": {
            "w": rng.standard_normal((40, 50)).astype(np.float32),  # 8000 B: spans 3 files
            "b": rng.standard_normal(7),  # 56 B
        },
        "opt": {
            "mu": rng.integers(-30000, 30000, 3000).astype(np.int16),  # 6000 B
            "nu": rng.standard_normal(1000).astype(ml_dtypes.bfloat16),  # 2000 B
        },
        "flags": rng.random(100) > 0.5,
        "big": rng.integers(0, 256, 10000, dtype=np.uint8),  # spans 3 files
        "scalar": np.float32(3.5),
        "layers": [
            rng.standard_normal((3, 4)).astype(np.float16),
            rng.integers(0, 9, (2, 2, 2)).astype(np.int64),
        ],
        "step": 7,
        "name": "run-a",
    }


ARRAY_KEYS = {
    "params/w": ("params", "w"),
    "params/b": ("params", "b"),
    "opt/mu": ("opt", "mu"),
    "opt/nu": ("opt", "nu"),
    "flags": ("flags",),
    "big": ("big",),
    "scalar": ("scalar",),
    "layers/0": ("layers", 0),
    "layers/1": ("layers", 1),
}


def get(tree: Any, path: tuple) -> Any:
    for seg in path:
        tree = tree[seg]
    return tree


def manifest_file(ckpt: Path) -> Path:
    """The manifest's name carries the save id recorded in the metadata."""
    return ckpt / CommitRecord.from_json((ckpt / METADATA).read_bytes(), "").manifest_path


def read_manifest(ckpt: Path) -> dict:
    return json.loads(manifest_file(ckpt).read_bytes())


def rewrite_metadata(ckpt: Path, **changes: Any) -> None:
    """Rewrite _CHECKPOINT_METADATA through stepsafe's own class, so that whatever integrity
    fields it carries are recomputed (changes naming fields it does not have are dropped)."""
    doc = json.loads((ckpt / METADATA).read_bytes())
    doc.update(changes)
    names = {f.name for f in dataclasses.fields(CommitRecord)}
    meta = CommitRecord(**{k: v for k, v in doc.items() if k in names})
    (ckpt / METADATA).write_bytes(meta.to_json())


def write_manifest(ckpt: Path, doc: dict | bytes, *, seal: bool = True) -> None:
    """Replace the manifest; ``seal``: also update its checksum, as a forger would."""
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    manifest_file(ckpt).write_bytes(raw)
    if seal:
        rewrite_metadata(ckpt, manifest_checksum=checksum(raw))


def chunks_of(doc: dict, key: str) -> list[tuple[str, int, int]]:
    """(file, offset, length) of each chunk of ``key``, in the array's byte order."""
    out = []
    for shard in doc["arrays"][key]["shards"]:
        out.extend((name, offset, length) for name, offset, length, _ in shard["chunks"])
    return out


def byte_location(doc: dict, key: str, pos: int) -> tuple[str, int, int]:
    """Where byte ``pos`` of array ``key`` lies: (file, chunk offset, offset in the file)."""
    start = 0
    for name, offset, length in chunks_of(doc, key):
        if pos < start + length:
            return name, offset, offset + pos - start
        start += length
    raise AssertionError(f"{key} has no byte {pos}")


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        assert len(b) == 1
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def names_offset(msg: str, *offsets: int) -> bool:
    alts = "|".join(str(o) for o in offsets)
    return re.search(rf"offset\D{{0,20}}\b({alts})\b", msg) is not None


@pytest.fixture
def state() -> dict[str, Any]:
    return make_state()


@pytest.fixture
def ckpt(tmp_path: Path, state: dict[str, Any]) -> Path:
    path = tmp_path / "ckpt" / "1"
    stepsafe.save(path, state, data_file_size_bytes=FILE_SIZE)
    return path


def data_files(ckpt: Path) -> list[Path]:
    return sorted((ckpt / "items").glob("*.data"))


def test_fixture_spreads_over_several_files(ckpt, state):
    doc = read_manifest(ckpt)
    assert len(data_files(ckpt)) >= 6
    assert set(doc["arrays"]) == set(ARRAY_KEYS)
    for key in ("params/w", "big"):  # these really straddle data files
        assert len({name for name, _, _ in chunks_of(doc, key)}) >= 2
    assert_bit_exact(stepsafe.restore(ckpt), state)


# ---------------------------------------------------------------- flipped bytes -> checksums


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("key", list(ARRAY_KEYS))
def test_flipped_data_byte_is_a_checksum_mismatch(ckpt, state, key, where):
    doc = read_manifest(ckpt)
    original = np.asarray(get(state, ARRAY_KEYS[key]))
    nbytes = original.nbytes
    pos = {"first": 0, "middle": nbytes // 2, "last": nbytes - 1}[where]
    name, chunk_offset, file_pos = byte_location(doc, key, pos)
    flip(ckpt / "items" / name, file_pos)

    for kwargs in ({}, {"select": ARRAY_KEYS[key][0]}):
        with pytest.raises(ChecksumMismatchError) as ei:
            stepsafe.restore(ckpt, **kwargs)
        msg = str(ei.value)
        assert repr(key) in msg, msg
        assert name in msg, msg
        assert names_offset(msg, chunk_offset, file_pos), msg
    # through the run directory too (latest committed step is this one)
    with pytest.raises(ChecksumMismatchError, match=re.escape(repr(key))):
        stepsafe.restore(ckpt.parent)

    # verify=False reads it anyway: exactly that one byte differs, everything else is intact
    out = stepsafe.restore(ckpt, verify=False)
    got = np.asarray(get(out, ARRAY_KEYS[key]))
    assert (got.dtype, got.shape) == (original.dtype, original.shape)
    got_bytes = np.frombuffer(got.tobytes(), np.uint8)
    want_bytes = np.frombuffer(original.tobytes(), np.uint8).copy()
    want_bytes[pos] ^= 0xFF
    assert np.array_equal(got_bytes, want_bytes)
    for other, path in ARRAY_KEYS.items():
        if other != key:
            assert_bit_exact(get(out, path), get(state, path), other)
    assert out["step"] == 7 and out["name"] == "run-a"

    # only that array's bytes are damaged: the others restore verified; metadata reads no data
    other = "big" if key != "big" else "params/w"
    assert_bit_exact(stepsafe.restore(ckpt, select=other), get(state, ARRAY_KEYS[other]), other)
    assert stepsafe.metadata(ckpt)[ARRAY_KEYS[key][0]] is not None


@pytest.fixture(scope="module")
def shared_ckpt(tmp_path_factory) -> tuple[Path, list[tuple[str, str, int, int]]]:
    """One checkpoint for the property test, and every chunk: (key, file, offset, length)."""
    path = tmp_path_factory.mktemp("prop") / "1"
    stepsafe.save(path, make_state(), data_file_size_bytes=FILE_SIZE)
    doc = read_manifest(path)
    chunks = [(key, *c) for key in sorted(doc["arrays"]) for c in chunks_of(doc, key)]
    assert len(chunks) >= 12
    return path, chunks


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.data())
def test_any_flipped_byte_in_any_chunk_is_caught(shared_ckpt, data):
    path, chunks = shared_ckpt
    key, name, offset, length = data.draw(st.sampled_from(chunks), label="chunk")
    pos = offset + data.draw(st.integers(0, length - 1), label="byte in chunk")
    mask = data.draw(st.integers(1, 255), label="xor mask")
    stepsafe.restore(path)  # intact before (the previous example put its byte back)
    flip(path / "items" / name, pos, mask)
    try:
        with pytest.raises(ChecksumMismatchError) as ei:
            stepsafe.restore(path)
        msg = str(ei.value)
        assert repr(key) in msg and name in msg and names_offset(msg, offset, pos), msg
        others = [k for k in {c[0] for c in chunks} if k != key]
        assert not any(repr(k) in msg for k in others), msg
    finally:
        flip(path / "items" / name, pos, mask)


# ---------------------------------------------------------------- truncated / missing data


@pytest.mark.parametrize("cut", ["empty", "half", "minus_one"])
@pytest.mark.parametrize("which", [0, 1, 3, -1])
def test_truncated_data_file(ckpt, which, cut):
    target = data_files(ckpt)[which]
    size = target.stat().st_size
    new_size = {"empty": 0, "half": size // 2, "minus_one": size - 1}[cut]
    os.truncate(target, new_size)
    for verify in (True, False):  # detected even without checksums: never garbage
        with pytest.raises(TruncatedDataError) as ei:
            stepsafe.restore(ckpt, verify=verify)
        assert target.name in str(ei.value)
    stepsafe.metadata(ckpt)  # reads no data: still fine


@pytest.mark.parametrize("which", [0, 2, -1])
def test_deleted_data_file(ckpt, which):
    target = data_files(ckpt)[which]
    target.unlink()
    for verify in (True, False):
        with pytest.raises(TruncatedDataError) as ei:
            stepsafe.restore(ckpt, verify=verify)
        assert target.name in str(ei.value)
    assert stepsafe.metadata(ckpt)["params"]["w"].shape == (40, 50)


def test_data_file_replaced_by_directory(ckpt):
    target = data_files(ckpt)[0]
    target.unlink()
    target.mkdir()
    for verify in (True, False):
        with pytest.raises(CorruptCheckpointError, match=re.escape(target.name)):
            stepsafe.restore(ckpt, verify=verify)


# ---------------------------------------------------------------- corrupt manifests

Mutation = Callable[[dict, Path], "dict | bytes"]


def _chunk(doc: dict, key: str = "params/w", i: int = 0) -> list:
    return doc["arrays"][key]["shards"][0]["chunks"][i]


def _set(fn: Callable[[dict], None]) -> Mutation:
    def mutate(doc: dict, root: Path) -> dict:
        fn(doc)
        return doc

    return mutate


def _rename_file(new: str | Callable[[Path], str], plant: Callable[[Path], Path] | None):
    """Rename the first data file in the manifest to ``new``; if ``plant`` is given, put a copy
    of the real bytes where that name would lead (so that following it would "work")."""

    def mutate(doc: dict, root: Path) -> dict:
        old = sorted(doc["files"])[0]
        name = new(root) if callable(new) else new
        if plant is not None:
            dest = plant(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / "ckpt" / "1" / "items" / old, dest)
        doc["files"] = {(name if n == old else n): s for n, s in doc["files"].items()}
        for a in doc["arrays"].values():
            for shard in a["shards"]:
                for c in shard["chunks"]:
                    if c[0] == old:
                        c[0] = name
        return doc

    return mutate


def _raw(fn: Callable[[bytes], bytes]) -> Mutation:
    def mutate(doc: dict, root: Path) -> bytes:
        return fn(json.dumps(doc).encode())

    return mutate


def _first_file_size(doc: dict) -> int:
    return doc["files"][_chunk(doc)[0]]


def _nest(depth: int) -> Mutation:
    def mutate(doc: dict, root: Path) -> bytes:
        doc["structure"] = "@@"
        nested = '["list",[' * depth + '["leaf"]' + "]]" * depth
        return json.dumps(doc).replace('"@@"', nested).encode()

    return mutate


def _unhashable_dict_key(doc: dict, root: Path) -> dict:
    doc["structure"] = ["dict", [[1]], [["leaf"]]]
    doc["arrays"], doc["values"] = {}, {"[1]": 5}
    return doc


def _overlapping_shards(doc: dict, root: Path) -> dict:
    # Two shards over the same first half of "big" (valid chunks, valid checksums): together they
    # "cover" 10000 elements, but elements 5000.. are never read; np.empty's garbage comes back.
    entry = doc["arrays"]["big"]
    half, need = [], 5000
    for name, offset, length, digest in entry["shards"][0]["chunks"]:
        n = min(length, need)
        raw = (root / "ckpt" / "1" / "items" / name).read_bytes()[offset : offset + n]
        half.append([name, offset, n, digest if n == length else checksum(raw)])
        need -= n
        if not need:
            break
    entry["shards"] = [{"index": [[0, 5000]], "chunks": half}] * 2
    return doc


MANIFEST_CASES: list[tuple[str, Mutation, type[StepsafeError]]] = [
    # not JSON at all
    ("garbage", _raw(lambda r: b"\x00\xffgarbage\x89PNG\r\n" * 8), ManifestError),
    ("empty-file", _raw(lambda r: b""), ManifestError),
    ("truncated-half", _raw(lambda r: r[: len(r) // 2]), ManifestError),
    ("truncated-last-byte", _raw(lambda r: r[:-1]), ManifestError),
    ("not-utf8", _raw(lambda r: b"\xff\xfe" + r), ManifestError),
    ("zeroed", _raw(lambda r: bytes(len(r))), ManifestError),
    # JSON, but not a manifest
    ("json-null", _raw(lambda r: b"null"), ManifestError),
    ("json-list", _raw(lambda r: b"[1, 2]"), ManifestError),
    ("json-number", _raw(lambda r: b"42"), ManifestError),
    ("json-string", _raw(lambda r: b'"stepsafe"'), ManifestError),
    ("json-empty-object", _raw(lambda r: b"{}"), ManifestError),
    ("foreign-format", _set(lambda d: d.update(format="orbax")), ManifestError),
    ("unknown-checksum", _set(lambda d: d.update(checksum="md5")), ManifestError),
    ("no-arrays", _set(lambda d: d.pop("arrays")), ManifestError),
    ("no-files", _set(lambda d: d.pop("files")), ManifestError),
    ("no-structure", _set(lambda d: d.pop("structure")), ManifestError),
    ("no-values", _set(lambda d: d.pop("values")), ManifestError),
    # future or foreign versions
    ("version-99", _set(lambda d: d.update(format_version=99)), UnsupportedFormatError),
    ("version-3", _set(lambda d: d.update(format_version=3)), UnsupportedFormatError),
    # wrong types
    ("arrays-is-list", _set(lambda d: d.update(arrays=[])), ManifestError),
    ("files-is-list", _set(lambda d: d.update(files=list(d["files"]))), ManifestError),
    ("values-is-number", _set(lambda d: d.update(values=5)), ManifestError),
    ("array-entry-is-str", _set(lambda d: d["arrays"].update({"big": "x"})), ManifestError),
    ("shards-is-dict", _set(lambda d: d["arrays"]["big"].update(shards={})), ManifestError),
    ("file-size-str", _set(lambda d: d["files"].update({k: "4096" for k in d["files"]})),
     ManifestError),
    ("file-size-float", _set(lambda d: d["files"].update({k: 4096.0 for k in d["files"]})),
     ManifestError),
    ("file-size-negative", _set(lambda d: d["files"].update({k: -1 for k in d["files"]})),
     ManifestError),
    ("file-size-bool", _set(lambda d: d["files"].update({k: True for k in d["files"]})),
     ManifestError),
    ("shape-negative", _set(lambda d: d["arrays"]["big"].update(shape=[-10000])), ManifestError),
    ("shape-float", _set(lambda d: d["arrays"]["big"].update(shape=[10000.0])), ManifestError),
    ("shape-str", _set(lambda d: d["arrays"]["big"].update(shape="10000")), ManifestError),
    ("shape-wrong", _set(lambda d: d["arrays"]["big"].update(shape=[10001])), ManifestError),
    ("shape-wrong-rank", _set(lambda d: d["arrays"]["big"].update(shape=[100, 100])),
     ManifestError),
    ("chunk-offset-negative", _set(lambda d: _chunk(d).__setitem__(1, -64)), ManifestError),
    ("chunk-offset-str", _set(lambda d: _chunk(d).__setitem__(1, "0")), ManifestError),
    ("chunk-offset-float", _set(lambda d: _chunk(d).__setitem__(1, 0.0)), ManifestError),
    ("chunk-offset-null", _set(lambda d: _chunk(d).__setitem__(1, None)), ManifestError),
    ("chunk-length-negative", _set(lambda d: _chunk(d).__setitem__(2, -1)), ManifestError),
    ("chunk-beyond-file", _set(lambda d: _chunk(d).__setitem__(1, _first_file_size(d))),
     ManifestError),
    ("chunk-past-end-by-one", _set(lambda d: _chunk(d).__setitem__(
        1, _first_file_size(d) - _chunk(d)[2] + 1)), ManifestError),
    ("chunk-huge-offset", _set(lambda d: _chunk(d).__setitem__(1, 2**70)), ManifestError),
    ("chunk-length-mismatch", _set(lambda d: _chunk(d).__setitem__(2, _chunk(d)[2] - 4)),
     ManifestError),
    ("chunk-three-fields", _set(lambda d: _chunk(d).pop()), ManifestError),
    ("chunk-is-str", _set(lambda d: d["arrays"]["params/w"]["shards"][0]["chunks"].__setitem__(
        0, "abcd")), ManifestError),
    ("chunk-unlisted-file",
     _set(lambda d: _chunk(d).__setitem__(0, "process_0.99999.data")), ManifestError),
    ("index-beyond-shape",
     _set(lambda d: d["arrays"]["big"]["shards"][0].update(index=[[0, 10001]])), ManifestError),
    ("index-negative",
     _set(lambda d: d["arrays"]["big"]["shards"][0].update(index=[[-1, 9999]])), ManifestError),
    ("index-reversed",
     _set(lambda d: d["arrays"]["big"]["shards"][0].update(index=[[10000, 0]])), ManifestError),
    ("index-wrong-rank",
     _set(lambda d: d["arrays"]["big"]["shards"][0].update(index=[[0, 100], [0, 100]])),
     ManifestError),
    ("no-shards", _set(lambda d: d["arrays"]["big"].update(shards=[])), ManifestError),
    ("duplicate-shard", _set(lambda d: d["arrays"]["big"]["shards"].append(
        copy.deepcopy(d["arrays"]["big"]["shards"][0]))), ManifestError),
    # unknown or unsafe dtypes
    *[
        (f"dtype-{s!r}", _set(lambda d, s=s: d["arrays"]["big"].update(dtype=s)), ManifestError)
        for s in ["O", "|O", "<V8", "|V1", "V8", "object", "<f3", "<i3", "|b2", "<U", "", None,
                  5, ["<f4"], {"name": "float32"}, "[('a', '<i4')]", "|u1\n", "numpy.dtype"]
    ],
    # data file names that would leave the checkpoint's items/ directory
    ("name-dotdot", _rename_file("../../escape.data", lambda r: r / "ckpt" / "escape.data"),
     ManifestError),
    ("name-dotdot-deeper", _rename_file("../../../etc/passwd", None), ManifestError),
    ("name-etc-passwd", _rename_file("/etc/passwd", None), ManifestError),
    ("name-absolute", _rename_file(lambda r: str(r / "abs.data"), lambda r: r / "abs.data"),
     ManifestError),
    ("name-slash", _rename_file("sub/x.data", lambda r: r / "ckpt" / "1" / "items" / "sub" /
                                "x.data"), ManifestError),
    ("name-dotdot-alone", _rename_file("..", None), ManifestError),
    ("name-dot", _rename_file(".", None), ManifestError),
    ("name-empty", _rename_file("", None), ManifestError),
    ("name-backslash", _rename_file("..\\..\\x.data", None), ManifestError),
    ("name-nul", _rename_file("x\x00.data", None), ManifestError),
    # structure and leaves that disagree
    ("structure-missing-leaf",
     _set(lambda d: d.update(structure=["dict", ["step"], [["leaf"]]])), ManifestError),
    ("structure-extra-leaf", _set(lambda d: d["structure"][1].append("ghost") or
                                  d["structure"][2].append(["leaf"])), ManifestError),
    ("structure-unknown-node", _set(lambda d: d.update(structure=["evil", []])), ManifestError),
    ("structure-not-list", _set(lambda d: d.update(structure="leaf")), ManifestError),
    ("structure-number", _set(lambda d: d.update(structure=5)), ManifestError),
    ("structure-empty", _set(lambda d: d.update(structure=[])), ManifestError),
    ("structure-object", _set(lambda d: d.update(structure={"0": "leaf"})), ManifestError),
    ("structure-duplicate-key",
     _set(lambda d: d.update(structure=["dict", ["big", "big"], [["leaf"], ["leaf"]]])),
     ManifestError),
    ("array-not-in-structure", _set(lambda d: d["arrays"].update(
        ghost=copy.deepcopy(d["arrays"]["big"]))), ManifestError),
    ("value-not-in-structure", _set(lambda d: d["values"].update(ghost=1)), ManifestError),
    ("leaf-both-array-and-value", _set(lambda d: d["values"].update(big=1)), ManifestError),
    ("dict-keys-children-mismatch", _set(lambda d: d["structure"][1].pop()), ManifestError),
    ("list-as-dict-key", _unhashable_dict_key, ManifestError),
    ("nested-900", _nest(900), ManifestError),
    ("nested-100000", _nest(100_000), ManifestError),
    ("overlapping-shards", _overlapping_shards, ManifestError),
]  # fmt: skip


@pytest.fixture
def read_log(monkeypatch) -> list[str]:
    """Every path the local storage reads (bytes, ranges, sizes) during the test."""
    log: list[str] = []
    for method in ("read_into", "read_bytes", "size"):
        original = getattr(LocalStorage, method)

        def spy(self, path, *args, _original=original, **kwargs):
            log.append(path)
            return _original(self, path, *args, **kwargs)

        monkeypatch.setattr(LocalStorage, method, spy)
    return log


@pytest.mark.parametrize("seal", [True, False], ids=["crafted", "damaged"])
@pytest.mark.parametrize(
    ("mutate", "expected"),
    [pytest.param(m, e, id=i) for i, m, e in MANIFEST_CASES],
)
def test_corrupt_manifest(ckpt, state, mutate, expected, seal, read_log):
    root = ckpt.parent.parent
    name = manifest_file(ckpt).name
    result = mutate(read_manifest(ckpt), root)
    write_manifest(ckpt, result, seal=seal)
    # damage alone may be caught by a checksum over the manifest before it is parsed
    allowed = (expected,) if seal else (expected, ChecksumMismatchError)
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("restore", lambda: stepsafe.restore(ckpt)),
        ("restore-unverified", lambda: stepsafe.restore(ckpt, verify=False)),
        ("restore-select", lambda: stepsafe.restore(ckpt, select="params")),
        ("restore-target", lambda: stepsafe.restore(ckpt, state)),
        ("restore-run-dir", lambda: stepsafe.restore(ckpt.parent)),
        ("metadata", lambda: stepsafe.metadata(ckpt)),
        ("info", lambda: stepsafe.info(ckpt)),
    ]
    for what, call in calls:
        try:
            call()
        except StepsafeError as e:
            assert type(e) in allowed, f"{what}: {type(e).__name__}: {e}"
            assert name in str(e), f"{what}: {e}"
        except Exception as e:  # anything else is a bug: the caller can't catch it sensibly
            pytest.fail(f"{what} raised {type(e).__name__} (not a StepsafeError): {e}")
        else:
            pytest.fail(f"{what} accepted a corrupt manifest")
    real = ckpt.resolve()
    outside = [p for p in read_log if not Path(p).resolve().is_relative_to(real)]
    assert not outside, f"read outside the checkpoint: {outside}"
    if expected is UnsupportedFormatError and seal:
        with pytest.raises(UnsupportedFormatError, match="version"):
            stepsafe.restore(ckpt)


def test_format_version_99_says_which_version(ckpt):
    doc = read_manifest(ckpt)
    doc["format_version"] = 99
    write_manifest(ckpt, doc)
    with pytest.raises(UnsupportedFormatError, match=r"\b99\b"):
        stepsafe.restore(ckpt)


def _absurd_shape(doc: dict, root: Path) -> dict:
    # Consistent with itself: the declared file size (never checked against the real file)
    # is big enough for the chunk, so the reader allocates 2**61 float32s before reading.
    name = sorted(doc["files"])[0]
    doc["files"] = {name: 2**64}
    doc["structure"] = ["dict", ["x"], [["leaf"]]]
    doc["values"] = {}
    doc["arrays"] = {
        "x": {
            "dtype": "<f4",
            "shape": [2**61],
            "shards": [{"index": [[0, 2**61]], "chunks": [[name, 0, 2**63, "0"]]}],
        }
    }
    return doc


def test_manifest_declaring_absurd_sizes(ckpt):
    name = manifest_file(ckpt).name
    write_manifest(ckpt, _absurd_shape(read_manifest(ckpt), ckpt.parent.parent))
    refused = r"more than the 67108864 bytes|beyond what numpy can hold"
    with pytest.raises(ManifestError, match=refused):
        stepsafe.metadata(ckpt)  # no writer writes a 2**63-byte chunk: refused at parse
    for verify in (True, False):  # reading it must fail cleanly, before allocating 8 EiB
        with pytest.raises(CorruptCheckpointError) as ei:
            stepsafe.restore(ckpt, verify=verify)
        assert "process_0.00000." in str(ei.value) or name in str(ei.value)


def test_deeply_nested_checkpoint_metadata(ckpt):
    (ckpt / METADATA).write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ManifestError, match=METADATA):
        stepsafe.restore(ckpt)


@pytest.fixture(scope="module")
def json_ckpt(tmp_path_factory) -> tuple[Path, Any, Any]:
    """A checkpoint with inline values and user metadata, its restored tree and its info."""
    path = tmp_path_factory.mktemp("json") / "1"
    stepsafe.save(path, make_state(), custom_metadata={"loss": 2.5, "tag": "abc"})
    return path, stepsafe.restore(path), stepsafe.info(path)


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.data())
def test_any_flipped_byte_in_the_json_files_is_caught_or_harmless(json_ckpt, data):
    """Bytes of the manifest and _CHECKPOINT_METADATA (inline values such as the step, user
    metadata) are covered too: a flip is refused with a StepsafeError, or it changed nothing
    (e.g. one JSON whitespace byte into another)."""
    path, tree, info = json_ckpt
    target = data.draw(st.sampled_from([manifest_file(path), path / METADATA]), label="file")
    pos = data.draw(st.integers(0, target.stat().st_size - 1), label="byte")
    mask = data.draw(st.integers(1, 255), label="xor mask")
    flip(target, pos, mask)
    try:
        try:
            got, got_info = stepsafe.restore(path), stepsafe.info(path)
        except (CorruptCheckpointError, UnsupportedFormatError, IncompleteCheckpointError):
            return
        assert_bit_exact(got, tree)
        assert (got_info.step, got_info.custom_metadata) == (info.step, info.custom_metadata)
        assert got_info.commit_timestamp_nsecs == info.commit_timestamp_nsecs
    finally:
        flip(target, pos, mask)


@pytest.mark.parametrize(
    ("old", "new"),
    [(b'"step":7', b'"step":6'), (b'"run-a"', b'"run-`"')],
)
def test_edited_inline_value_in_manifest_is_caught(ckpt, old, new):
    raw = manifest_file(ckpt).read_bytes()
    assert raw.count(old) == 1
    write_manifest(ckpt, raw.replace(old, new), seal=False)
    with pytest.raises(CorruptCheckpointError):
        stepsafe.restore(ckpt)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x00garbage\xff", ManifestError),
        (b"", ManifestError),
        (b'{"format": "stepsafe", "format_version": 1', ManifestError),
        (b"[]", ManifestError),
        (b"null", ManifestError),
        (b"[" * 100_000, ManifestError),
        (b'{"format": "orbax", "format_version": 1}', ManifestError),
        (b'{"format": "stepsafe", "format_version": 1}', CorruptCheckpointError),
        (b'{"format": "stepsafe", "format_version": 1, "init_timestamp_nsecs": "x"}',
         CorruptCheckpointError),
        (b'{"format": "stepsafe", "format_version": 99, "init_timestamp_nsecs": 1}',
         UnsupportedFormatError),
    ],
    ids=["garbage", "empty", "truncated", "list", "null", "nested", "foreign", "no-fields",
         "timestamp-str", "version-99"],
)  # fmt: skip
def test_corrupt_checkpoint_metadata(ckpt, raw, expected):
    (ckpt / METADATA).write_bytes(raw)
    for call in (stepsafe.restore, stepsafe.metadata, stepsafe.info):
        with pytest.raises(expected) as ei:
            call(ckpt)
        if expected is not CorruptCheckpointError:
            assert type(ei.value) is expected
        assert METADATA in str(ei.value)


@pytest.mark.parametrize(
    "changes",
    [{"init_timestamp_nsecs": "x"}, {"step": "seven"}, {"custom_metadata": 5}],
    ids=["timestamp-str", "step-str", "custom-metadata-int"],
)
def test_crafted_checkpoint_metadata_with_wrong_types(ckpt, changes):
    rewrite_metadata(ckpt, **changes)
    for call in (stepsafe.restore, stepsafe.metadata, stepsafe.info):
        with pytest.raises(ManifestError, match=METADATA):
            call(ckpt)


def test_uncommitted_metadata_is_incomplete(ckpt):
    rewrite_metadata(ckpt, commit_timestamp_nsecs=None)
    with pytest.raises(IncompleteCheckpointError, match=re.escape(str(ckpt))):
        stepsafe.restore(ckpt)
    with pytest.raises(IncompleteCheckpointError):
        stepsafe.restore(ckpt.parent)  # the only step there is not committed


# ---------------------------------------------------------------- missing commit marker etc.


def test_missing_commit_marker_is_incomplete(ckpt, tmp_path):
    (ckpt / METADATA).unlink()
    for call in (stepsafe.restore, stepsafe.metadata, stepsafe.info):
        with pytest.raises(IncompleteCheckpointError) as ei:
            call(ckpt)
        assert str(ckpt) in str(ei.value)
    with pytest.raises(IncompleteCheckpointError) as ei:
        stepsafe.restore(ckpt.parent)
    assert re.search(r"\b1\b", str(ei.value).replace(str(ckpt.parent), "")), str(ei.value)


def test_missing_commit_marker_falls_back_to_earlier_step(tmp_path, state):
    root = tmp_path / "ckpt"
    earlier = {"a": np.arange(5)}
    stepsafe.save(root / "1", earlier)
    stepsafe.save(root / "2", state, data_file_size_bytes=FILE_SIZE)
    assert_bit_exact(stepsafe.restore(root), state)
    (root / "2" / METADATA).unlink()
    assert_bit_exact(stepsafe.restore(root), earlier)


def test_missing_manifest(ckpt):
    name = manifest_file(ckpt).name
    manifest_file(ckpt).unlink()
    for call in (stepsafe.restore, stepsafe.metadata, stepsafe.info):
        with pytest.raises(StepsafeError) as ei:
            call(ckpt)
        assert isinstance(ei.value, TruncatedDataError)
        assert name in str(ei.value)


# ---------------------------------------------------------------- where is the checkpoint?


def test_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope" / "1000"
    for call in (stepsafe.restore, stepsafe.metadata, stepsafe.info):
        with pytest.raises(CheckpointNotFoundError, match=re.escape(str(missing))):
            call(missing)
    assert not (tmp_path / "nope").exists()  # looking never creates anything


def test_directory_without_checkpoint(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError):
        stepsafe.restore(empty)
    junk = tmp_path / "junk"
    (junk / "notes").mkdir(parents=True)
    (junk / "readme.txt").write_text("hello")
    (junk / "checkpoints").mkdir()
    for call in (stepsafe.restore, stepsafe.metadata):
        with pytest.raises(CheckpointNotFoundError, match=re.escape(str(junk))):
            call(junk)
    with pytest.raises(CheckpointNotFoundError):
        stepsafe.restore(junk / "readme.txt")  # a file is not a checkpoint either


def test_temporary_directory_is_incomplete(ckpt, tmp_path):
    # even a complete-looking copy is refused under a temporary's name
    tmp = ckpt.parent / "5.stepsafe-tmp-somehost-123-abcd"
    shutil.copytree(ckpt, tmp)
    for call in (stepsafe.restore, stepsafe.metadata, stepsafe.info):
        with pytest.raises(IncompleteCheckpointError) as ei:
            call(tmp)
        assert tmp.name in str(ei.value)
    only_tmp = tmp_path / "only"
    only_tmp.mkdir()
    shutil.move(tmp, only_tmp / tmp.name)
    with pytest.raises(IncompleteCheckpointError, match=re.escape(tmp.name)):
        stepsafe.restore(only_tmp)
    # next to a committed step, the committed one is the checkpoint
    shutil.copytree(only_tmp / tmp.name, ckpt.parent / tmp.name)
    assert stepsafe.info(ckpt.parent).path == str(ckpt)


# ---------------------------------------------------------------- targets and select


def _without(tree: dict, *path: Any) -> dict:
    tree = copy.deepcopy(tree)
    del get(tree, path[:-1])[path[-1]]
    return tree


def test_target_wrong_shape(ckpt, state):
    target = copy.deepcopy(state)
    target["params"]["w"] = np.zeros((50, 40), np.float32)
    with pytest.raises(TargetMismatchError) as ei:
        stepsafe.restore(ckpt, target)
    msg = str(ei.value)
    assert "'params/w'" in msg and "(40, 50)" in msg and "(50, 40)" in msg, msg
    target = copy.deepcopy(state)
    target["layers"][1] = np.zeros((2, 2), np.int64)
    with pytest.raises(TargetMismatchError, match="'layers/1'"):
        stepsafe.restore(ckpt, target)
    target = copy.deepcopy(state)
    target["scalar"] = np.zeros((1,), np.float32)  # 0-d in the checkpoint
    with pytest.raises(TargetMismatchError, match="'scalar'"):
        stepsafe.restore(ckpt, target)
    target = copy.deepcopy(state)
    target["big"] = 0  # a Python scalar for a 10000-element array
    with pytest.raises(TargetMismatchError, match="'big'"):
        stepsafe.restore(ckpt, target)


def test_target_wrong_shape_select(ckpt, state):
    target = copy.deepcopy(state["opt"])
    target["nu"] = np.zeros(999, ml_dtypes.bfloat16)
    with pytest.raises(TargetMismatchError, match="'opt/nu'"):
        stepsafe.restore(ckpt, target, select="opt")


def test_target_missing_and_extra_keys(ckpt, state):
    with pytest.raises(TargetMismatchError) as ei:
        stepsafe.restore(ckpt, _without(state, "opt", "nu"))
    assert "'opt/nu'" in str(ei.value)
    assert "'opt/mu'" not in str(ei.value)

    extra = copy.deepcopy(state)
    extra["params"]["extra"] = np.zeros(3)
    with pytest.raises(TargetMismatchError) as ei:
        stepsafe.restore(ckpt, extra)
    assert "'params/extra'" in str(ei.value)
    assert "'params/w'" not in str(ei.value)

    both = _without(state, "step")
    both["layers"].append(np.zeros(1))
    with pytest.raises(TargetMismatchError) as ei:
        stepsafe.restore(ckpt, both)
    assert "'step'" in str(ei.value) and "'layers/2'" in str(ei.value)

    renamed = _without(state, "big")
    renamed["bigger"] = state["big"]
    with pytest.raises(TargetMismatchError) as ei:
        stepsafe.restore(ckpt, renamed)
    assert "'big'" in str(ei.value) and "'bigger'" in str(ei.value)


def test_select_missing_key(ckpt):
    for select in ("params/nope", ("params", "nope"), "nope", "big/inner"):
        for call in (stepsafe.restore, stepsafe.metadata):
            with pytest.raises(TargetMismatchError) as ei:
                call(ckpt, select=select)
            assert "nope" in str(ei.value) or "inner" in str(ei.value), str(ei.value)


@pytest.mark.parametrize(
    ("key", "target_leaf"),
    [("step", np.zeros(3)), ("name", np.zeros(2, np.float32))],
)
def test_value_leaf_onto_array_target_of_other_shape(ckpt, state, key, target_leaf):
    target = copy.deepcopy(state)
    target[key] = target_leaf
    with pytest.raises(TargetMismatchError, match=repr(key)):
        stepsafe.restore(ckpt, target)


# ---------------------------------------------------------------- leaves that cannot be saved


class _Opaque:
    pass


BAD_LEAVES = {
    "object": lambda: object(),
    "lambda": lambda: lambda x: x,
    "instance": lambda: _Opaque(),
    "object-array": lambda: np.array([1, "a", None], dtype=object),
    "object-array-of-ints": lambda: np.arange(3).astype(object),
    "structured": lambda: np.zeros(3, dtype=[("a", "<i4"), ("b", "<f4")]),
    "structured-scalar": lambda: np.zeros(1, dtype=[("a", "<i4")])[0],
    "void": lambda: np.zeros(2, dtype="V8"),
    "set": lambda: {1, 2},
    "bytes": lambda: b"raw",
    "complex": lambda: 1 + 2j,
}


@pytest.mark.parametrize("where", ["dict", "list"])
@pytest.mark.parametrize("kind", list(BAD_LEAVES))
def test_unsupported_leaf_names_key_and_leaves_nothing(tmp_path, kind, where):
    root = tmp_path / "ckpt"
    stepsafe.save(root / "1", {"a": np.ones(3)})
    before = sorted(os.listdir(root))
    bad = BAD_LEAVES[kind]()
    if where == "dict":
        tree, key = {"params": {"w": np.ones((4, 4)), "bad": bad}, "step": 1}, "params/bad"
    else:
        tree, key = {"layers": [np.ones(2), np.ones(3), bad], "step": 1}, "layers/2"
    with pytest.raises(UnsupportedLeafError) as ei:
        stepsafe.save(root / "2", tree, data_file_size_bytes=FILE_SIZE)
    assert key in str(ei.value), str(ei.value)
    assert isinstance(ei.value, TypeError)
    assert sorted(os.listdir(root)) == before  # no step, no temporary
    assert stepsafe.storage.stale_temporaries(str(root)) == []
    # nothing at all when the parent did not exist either
    fresh = tmp_path / "fresh"
    with pytest.raises(UnsupportedLeafError):
        stepsafe.save(fresh / "1", tree)
    assert not fresh.exists()


@pytest.mark.parametrize(
    ("tree", "needle"),
    [
        ({"params": {("a", 1): np.ones(1)}}, "params"),
        ({"params": {1.5: np.ones(1)}}, "params"),
        ({"params": {1: np.ones(1), "1": np.ones(1)}}, "params/1"),
    ],
)
def test_unsupported_dict_keys(tmp_path, tree, needle):
    with pytest.raises(UnsupportedLeafError, match=re.escape(needle)):
        stepsafe.save(tmp_path / "1", tree)
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_metadata_leaves_nothing(tmp_path):
    with pytest.raises(UnsupportedLeafError, match="metadata"):
        stepsafe.save(tmp_path / "ckpt" / "1", {"a": np.ones(2)}, custom_metadata={"x": object()})
    assert not (tmp_path / "ckpt" / "1").exists()
    assert not list((tmp_path / "ckpt").glob("*stepsafe-tmp*"))


# ---------------------------------------------------------------- never overwrite


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_save_onto_existing_checkpoint(ckpt, state):
    before = _file_bytes(ckpt)
    other = {"params": {"w": np.zeros((2, 2))}, "step": 8}
    for kwargs in ({}, {"data_file_size_bytes": FILE_SIZE}):
        with pytest.raises(CheckpointExistsError) as ei:
            stepsafe.save(ckpt, other, **kwargs)
        assert str(ckpt) in str(ei.value)
        assert isinstance(ei.value, FileExistsError)
    assert _file_bytes(ckpt) == before
    assert sorted(os.listdir(ckpt.parent)) == ["1"]  # no temporary left behind
    assert_bit_exact(stepsafe.restore(ckpt), state)
    assert_bit_exact(stepsafe.restore(ckpt.parent), state)


def test_save_onto_incomplete_or_foreign_path_refused(tmp_path):
    half = tmp_path / "half"
    (half / "items").mkdir(parents=True)
    file = tmp_path / "file"
    file.write_bytes(b"precious")
    for target in (half, file):
        with pytest.raises(CheckpointExistsError):
            stepsafe.save(target, {"a": np.ones(2)})
    assert file.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "half"]


# ---------------------------------------------------------------- loading never runs code


EVIL_MODULE = "stepsafe_evil_probe_mod"


def test_manifest_cannot_make_restore_import_or_call(tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / f"{EVIL_MODULE}.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(sentinel)!r}).write_text('imported')\n"
        "class Boom:\n"
        "    def __init__(self, *a, **k):\n"
        f"        pathlib.Path({str(sentinel)!r}).write_text('called')\n"
        "def boom(*a, **k):\n"
        f"    pathlib.Path({str(sentinel)!r}).write_text('called')\n"
    )
    monkeypatch.syspath_prepend(str(lib))
    sys.modules.pop(EVIL_MODULE, None)
    calls: list[Any] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(("os.system", a)) or 0)
    monkeypatch.setattr(os, "popen", lambda *a, **k: calls.append(("os.popen", a)))

    path = tmp_path / "ckpt" / "1"
    stepsafe.save(
        path,
        {
            "sys": {"cmd": f"touch {sentinel}"},
            "nt": {"a": np.arange(3)},
            "node": {"x": 1},
            "v": {"__reduce__": "os.system"},
        },
    )
    doc = read_manifest(path)
    keys, children = doc["structure"][1], doc["structure"][2]
    assert keys == ["sys", "nt", "node", "v"]
    children[0] = ["node", "os.system", ["cmd"], children[0][2]]
    children[1] = ["namedtuple", f"{EVIL_MODULE}.Boom", ["a"], children[1][2]]
    children[2] = ["node", f"{EVIL_MODULE}.boom", ["x"], children[2][2]]
    write_manifest(path, doc)

    out = stepsafe.restore(path)
    meta = stepsafe.metadata(path)
    stepsafe.info(path)
    part = stepsafe.restore(path, select="nt")
    assert type(out) is dict and type(out["sys"]) is dict and type(out["nt"]) is dict
    assert out["sys"] == {"cmd": f"touch {sentinel}"}
    assert out["node"] == {"x": 1}
    assert out["v"] == {"__reduce__": "os.system"} and type(out["v"]) is dict
    np.testing.assert_array_equal(out["nt"]["a"], np.arange(3))
    assert type(part) is dict and list(part) == ["a"]
    assert meta["sys"] == {"cmd": f"touch {sentinel}"}
    assert meta["nt"]["a"].shape == (3,)
    assert calls == []
    assert EVIL_MODULE not in sys.modules
    assert not sentinel.exists()
