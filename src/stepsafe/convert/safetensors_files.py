"""Hugging Face safetensors files, written and read one tensor at a time.

    model.safetensors                                  one file, or
    model-00001-of-0000N.safetensors ...               several, split at a size limit, with
    model.safetensors.index.json                       {"metadata": {"total_size"}, "weight_map"}

A file is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and
byte range; ``__metadata__`` ``{"format": "pt"}``, which transformers expects) padded with
spaces to 8 bytes, then the tensors' bytes in C order. The safetensors library's writer takes
every tensor of a file in memory at once; this one writes the format itself, streaming each
tensor (an ``OutLeaf``, made when its turn comes, a little ahead of the write on a thread of
its own: ``pipeline.py``, and dropped after), so a model of any size needs about its largest
tensor in memory. Files are split as Hugging Face does: in order, a
new file when the next tensor would pass the limit, a tensor bigger than the limit alone. The
directory appears whole or not at all (a local transaction: a temporary renamed into place;
in a bucket, files under their final names, the index last, behind an exclusive claim).

Reading: a local file's header is checked by the safetensors library (``safe_open``), a
bucket's by the same rules here; each tensor is an ``OutLeaf`` read only when made (or a region
of it), by ranged reads the storage runs in parallel.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from stepsafe import knobs
from stepsafe.convert.lazy_leaf import OutLeaf, grouped
from stepsafe.convert.pipeline import Ahead
from stepsafe.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    ManifestError,
    StepsafeError,
)
from stepsafe.format.manifest import Box
from stepsafe.storage import RangeRead, Storage, is_bucket, storage_for

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
HF_SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB" (huggingface_hub's and transformers 4's)

log = logging.getLogger("stepsafe")

_MAX_HEADER = 100_000_000  # the safetensors library's limit on a header (bytes, decimal)

_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
    "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32",
    "float64": "F64", "int64": "I64", "uint64": "U64", "complex64": "C64",
}  # fmt: skip
# float8 (F8_E4M3, F8_E5M2) is left out: safetensors' numpy reader cannot read it back


def shard_names(count: int) -> list[str]:
    """The files of a model split in ``count``: Hugging Face's names."""
    if count == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_safetensors(
    directory: str,
    tensors: list[tuple[str, OutLeaf]],
    *,
    max_shard_bytes: int = HF_SHARD_BYTES,
    on_bytes: Callable[[int], None] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> list[str]:
    """Write ``tensors`` (name, array to make) as a Hugging Face safetensors directory; the
    files written. ``extra_files`` (e.g. ``config.json``) are written with them, in the same
    all-or-nothing write.

    Raises:
        ConfigError: a name is repeated, a dtype safetensors cannot hold, or
            ``max_shard_bytes`` < 1.
        CheckpointExistsError: ``directory`` exists (in a bucket: holds a file of the model).
        StorageError: as the storage raised it; nothing is left that a reader would take.
    """
    if max_shard_bytes < 1:
        raise ConfigError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    names = [n for n, _ in tensors]
    for name in names:
        if name == "__metadata__" or not _is_text(name):
            why = "reserved by the format" if name == "__metadata__" else "not Unicode text"
            raise ConfigError(f"tensor name {name!r} cannot be written: {why}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"tensor name {dup!r} is given twice: each name must be unique")
    for name, leaf in tensors:
        _dtype_name(name, leaf.dtype)
    groups = _split(grouped(tensors), max_shard_bytes)  # the index says where each one is
    files = shard_names(len(groups))
    for name in extra_files or {}:
        if name in files or name == INDEX or "/" in name or name in ("", ".", ".."):
            raise ConfigError(f"extra file {name!r} cannot be written beside the weights")
    url = str(directory)
    ahead = Ahead(  # made in the order written
        [leaf for group in groups for _, leaf in group],
        bucket=is_bucket(url),
    )
    firsts = [sum(len(g) for g in groups[:k]) for k in range(len(groups))]
    contents = [
        (file, _file_bytes(group, on_bytes, ahead, first))
        for file, group, first in zip(files, groups, firsts)
    ]
    extras = [(name, iter([bytes(body)])) for name, body in (extra_files or {}).items()]
    if len(files) > 1:  # the index last: readers look for it first
        index = {
            "metadata": {"total_size": sum(leaf.nbytes for _, leaf in tensors)},
            "weight_map": {n: f for f, g in zip(files, groups) for n, _ in g},
        }
        contents += [*extras, (INDEX, iter([json.dumps(index, indent=2).encode()]))]
    else:  # the one file last
        contents = [*extras, *contents]
    storage, path = storage_for(url if "://" in url else os.path.abspath(url))
    try:
        if not is_bucket(url):
            with storage.transaction(path) as txn:
                for file, chunks in contents:
                    txn.write_file(file, chunks)
                txn.commit()
        else:
            _upload(storage, path, contents, exclusive_last=len(files) > 1)
    finally:
        ahead.close()
    return [file for file, _ in contents]


CLAIM = ".stepsafe-writing"  # in a bucket prefix while an export writes there


def _upload(
    storage: Any, path: str, contents: list[tuple[str, Iterator[Any]]], *, exclusive_last: bool
) -> None:
    """A model directory in a bucket, which has no rename: every file is uploaded under its
    final name (an object appears whole or not at all), the one readers look for first last:
    the index, or the single file. Nothing is overwritten; a failure deletes only what this
    upload wrote, so an interrupted one leaves no model a reader would take.

    A bucket has no exclusive streaming upload, so two exports racing into one new prefix
    would overwrite each other's shards (same names), and the loser's clean-up would delete
    the winner's: each export first creates ``CLAIM`` exclusively (the race is decided there,
    before any shard), checks the prefix holds nothing else, and deletes the claim at the end.
    One killed midway leaves its claim (and shards, but no index): the prefix stays refused."""
    targets = [storage.join(path, file) for file, _ in contents]
    claim = storage.join(path, CLAIM)

    def refuse_if_used(there: list[str]) -> None:
        if CLAIM in there:
            raise CheckpointExistsError(
                f"{path} is being written by another export, or one was interrupted there (it "
                f"left {CLAIM}): write to a new directory, or delete {path} if none is running"
            )
        if there:  # as a local directory that exists: a model, or something else, is there
            raise CheckpointExistsError(
                f"{path} already holds {', '.join(sorted(there)[:3])}: stepsafe never writes "
                "into an existing model; write to a new directory"
            )

    refuse_if_used(storage.list_dir(path) if storage.exists(path) else [])
    try:
        storage.create_exclusive(claim, b"a stepsafe export is writing this model\n")
    except FileExistsError:
        refuse_if_used([CLAIM])
    written: list[str] = [claim]
    try:
        refuse_if_used([n for n in storage.list_dir(path) if n != CLAIM])
        for target, (_, chunks) in zip(targets, contents):
            if target == targets[-1] and exclusive_last:  # the index: created exclusively
                try:
                    storage.create_exclusive(target, b"".join(bytes(c) for c in chunks))
                except FileExistsError as e:
                    raise CheckpointExistsError(
                        f"{target} was written by another writer meanwhile: this one is undone"
                    ) from e
            else:
                written.append(target)  # before: a failed upload may leave an object
                storage.upload(target, chunks)
    except BaseException:
        for target in reversed(written):  # the claim last: the prefix stays claimed till then
            with contextlib.suppress(Exception):
                storage.delete_file(target)
        raise
    with contextlib.suppress(Exception):  # the model is whole: a claim left is harmless
        storage.delete_file(claim)


def _is_text(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _split(tensors: list[tuple[str, OutLeaf]], limit: int) -> list[list[tuple[str, OutLeaf]]]:
    groups: list[list[tuple[str, OutLeaf]]] = [[]]
    size = 0
    for item in tensors:
        n = item[1].nbytes
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    return groups


def _dtype_name(name: str, dtype: Any) -> str:
    found = _DTYPES.get(np.dtype(dtype).name)
    if found is None:
        raise ConfigError(
            f"tensor {name!r} has dtype {np.dtype(dtype)}, which safetensors cannot hold"
        )
    return found


def _file_bytes(
    group: list[tuple[str, OutLeaf]],
    on_bytes: Callable[[int], None] | None,
    ahead: Ahead,
    first: int,
) -> Iterator[bytes | memoryview]:
    """A file's bytes: its header, then its tensors' (``group``: arrays ``first`` .. of
    ``ahead``, made there a little ahead of the write)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, leaf in group:
        header[name] = {
            "dtype": _dtype_name(name, leaf.dtype),
            "shape": list(leaf.shape),
            "data_offsets": [pos, pos + leaf.nbytes],
        }
        pos += leaf.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    yield struct.pack("<Q", len(raw)) + raw
    for i, (name, _) in enumerate(group, first):
        try:
            for a in ahead.blocks(i):  # the tensor whole, or block by block when it is big
                if a.dtype.byteorder == ">":
                    a = a.astype(a.dtype.newbyteorder("<"))
                yield memoryview(a.reshape(-1).view(np.uint8))  # the storage cuts its writes
                if on_bytes is not None:
                    on_bytes(a.nbytes)
                del a  # written: its buffer may take the next block
        except ManifestError as e:
            raise StepsafeError(f"tensor {name!r}: {e}: nothing was written") from e


def read_safetensors(directory: str, *, single: str = SINGLE) -> list[tuple[str, OutLeaf]]:
    """The tensors of a Hugging Face model directory (``model.safetensors``, or the files its
    ``model.safetensors.index.json`` names, each holding the tensors it says), each read only
    when made. ``single``: the one file's name where it is another (a PEFT adapter's
    ``adapter_model.safetensors``; such a directory has no index).

    Raises:
        CheckpointNotFoundError: neither file is there.
        CorruptCheckpointError: the index or a file's header is unreadable, a file lacks a
            tensor the index puts there, a tensor is in two files, or a dtype not read here.
        StepsafeError: the safetensors library is not installed.
    """
    import ml_dtypes  # noqa: F401  (numpy reads bfloat16 once ml_dtypes is loaded)

    url = str(directory)
    storage, root = storage_for(url if "://" in url else os.path.abspath(url))
    local = not is_bucket(url)
    out: list[tuple[str, OutLeaf]] = []
    seen: set[str] = set()
    unlisted: list[tuple[str, str, Header]] = []  # in a file, not in the index
    for file, names in _files_of(storage, root, single, local=local).items():
        path = storage.join(root, file)
        if local:  # a model in Hugging Face's cache is made of links to its blobs
            path = os.path.realpath(path)
        held = _local_header(storage, path) if local else _header(storage, path)
        if names is not None:
            listed = set(names)
            unlisted += [(path, n, held) for n in held if n not in listed]
        for name in held if names is None else names:
            if name not in held:
                raise CorruptCheckpointError(
                    f"{directory}/{INDEX} puts tensor {name!r} in {file}, which lacks it"
                )
            out.append(_tensor(path, name, held, seen, directory, local, storage))
    # A tensor a shard holds that its index leaves out is a weight too (transformers loads
    # every tensor of the files it reads): named as unmapped, never silently dropped.
    out += [_tensor(p, n, h, seen, directory, local, storage) for p, n, h in unlisted]
    return out


def _tensor(
    path: str, name: str, held: Header, seen: set[str], directory: str, local: bool, storage: Any
) -> tuple[str, OutLeaf]:
    """Tensor ``name`` of the file at ``path`` as a lazy weight (one name, one file)."""
    if name in seen:
        raise CorruptCheckpointError(f"tensor {name!r} is in two files of {directory}")
    seen.add(name)
    shape, dtype, start = held[name]
    read = _tensor_reader(storage, path, start, shape, dtype)
    return name, OutLeaf(shape, dtype, read, box=read)


Header = dict[str, tuple[tuple[int, ...], np.dtype, int]]  # name -> shape, dtype, data start


def _local_header(storage: Storage, path: str) -> Header:
    """A local file's tensors: checked by the safetensors library (the authority on its
    format), then their byte ranges from the header (the library does not say where its
    tensors lie; the reads that follow are ours, in parallel)."""
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise StepsafeError(
            "reading safetensors needs the safetensors package: pip install 'stepsafe[safetensors]'"
        ) from e
    try:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is no mapping)
                _numpy_dtype(name, f.get_slice(name).get_dtype())
    except StepsafeError:
        raise
    except Exception as e:  # safetensors' SafetensorError is a bare Exception
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    return _header(storage, path)


def _header(storage: Storage, path: str) -> Header:
    """A file's tensors, from its header, checked as the library checks it (a bucket's file
    has no other check: the library reads local files only): tensors tile the data after the
    header exactly, in order."""
    size = storage.size(path)
    bad = f"{path} is not a readable safetensors file"
    if size < 8:
        raise CorruptCheckpointError(f"{bad}: {size} bytes")
    buf = bytearray(8)
    storage.read_into(path, 0, memoryview(buf))
    (n,) = struct.unpack("<Q", buf)
    if n > min(size - 8, _MAX_HEADER):
        raise CorruptCheckpointError(f"{bad}: a header of {n} bytes in a file of {size}")
    raw = bytearray(n)
    storage.read_into(path, 8, memoryview(raw))
    try:
        entries = sorted(_header_entries(raw).items(), key=lambda kv: kv[1][2])
        held: Header = {}
        end = 0
        for name, (shape, st_dtype, (a, b)) in entries:
            dtype = _numpy_dtype(name, st_dtype)
            if a != end or b - a != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {name!r}: bytes {a}..{b} for {shape} {dtype}")
            held[name], end = (shape, dtype, 8 + n + a), b
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"{bad}: {e}") from e
    if 8 + n + end != size:
        raise CorruptCheckpointError(f"{bad}: its tensors end at {8 + n + end}, the file at {size}")
    return held


Entries = dict[str, tuple[tuple[int, ...], Any, tuple[int, int]]]  # name -> shape, dtype, offsets


def _header_entries(raw: bytes | bytearray) -> Entries:
    """A header's tensors (name -> shape, safetensors dtype, data offsets), typed as the
    library's parser (serde) types them: counts are JSON integers (no floats, booleans or
    strings; within numpy's reach), ``__metadata__`` text to text, no NaN.

    Raises:
        ValueError: the header is not such a JSON object.
    """

    def no_constant(word: str) -> Any:
        raise ValueError(f"{word} is not JSON")

    def count(x: Any, what: str) -> int:
        if type(x) is not int or not 0 <= x < 1 << 63:
            raise ValueError(f"{what} {x!r} is not a count")
        return x

    doc = json.loads(raw, parse_constant=no_constant)
    if not isinstance(doc, dict):
        raise ValueError(f"the header is a JSON {type(doc).__name__}, not an object")
    meta = doc.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise ValueError("__metadata__ is not a map of text to text")
    out: Entries = {}
    for name, v in doc.items():
        if name == "__metadata__":
            continue
        if not isinstance(v, dict) or not isinstance(v.get("shape"), list):
            raise ValueError(f"tensor {name!r} is not described by a dtype, shape and offsets")
        offsets = v["data_offsets"]
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
        shape = tuple(count(x, f"tensor {name!r}: dimension") for x in v["shape"])
        begin, end = (count(x, f"tensor {name!r}: offset") for x in offsets)
        out[name] = (shape, v["dtype"], (begin, end))
    return out


def _files_of(
    storage: Storage, directory: str, single: str, *, local: bool
) -> dict[str, list[str] | None]:
    """Each file to read and the tensors in it (None: all it holds). Where both the one file
    and an index are there, the one file, as transformers' ``from_pretrained`` chooses: the
    import is then of the weights transformers would run."""
    index = storage.join(directory, INDEX)
    both = single == SINGLE and storage.exists(storage.join(directory, SINGLE))
    if both and storage.exists(index):
        log.warning(
            "%s holds both %s and %s: reading %s, as transformers does", directory, SINGLE,
            INDEX, SINGLE,
        )  # fmt: skip
    if single == SINGLE and not both and storage.exists(index):
        try:
            weight_map = json.loads(read_input_file(storage, index, 1 << 28, local=local))[
                "weight_map"
            ]
            files: dict[str, list[str] | None] = {}
            for name, file in weight_map.items():
                if not isinstance(file, str) or not _plain_name(file):
                    raise ValueError(
                        f"tensor {name!r} is put in {file!r}, not a file of the model's directory"
                    )
                files.setdefault(file, []).append(str(name))  # type: ignore[union-attr]
            return files
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(f"{index} is not a valid index: {e}") from e
    if storage.exists(storage.join(directory, single)):
        return {single: None}
    what = f"neither {SINGLE} nor {INDEX}" if single == SINGLE else f"no {single}"
    raise CheckpointNotFoundError(f"{directory} holds {what}: not a Hugging Face model")


def read_input_file(storage: Storage, path: str, limit: int, *, local: bool) -> bytes:
    """A small file of a model given as input (an index, ``config.json``), at most ``limit``
    bytes. On local disk it is read through symbolic links, as transformers reads it: a
    model in Hugging Face's cache (``snapshots/<revision>/*`` link to ``blobs/``) is made of
    links, which the storage's reads of checkpoints refuse.

    Raises:
        CorruptCheckpointError: it is not a regular file (after links), or bigger than
            ``limit``.
    """
    if not local:
        return storage.read_bytes(path, limit)
    if not os.path.isfile(path):  # a FIFO or device would block or never end
        raise CorruptCheckpointError(f"{path} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CorruptCheckpointError(f"{path} holds more than {limit} bytes: not a model's")
    return data


def _plain_name(file: str) -> bool:
    """A file name in the directory itself: an index naming ``../x`` or ``/x`` (or another
    bucket) would read files outside the model into the conversion's output."""
    bad = ("/", "\\", "://", "\0")
    return file not in ("", ".", "..") and not any(c in file for c in bad)


def _numpy_dtype(name: str, st: str) -> np.dtype:
    import ml_dtypes

    for np_name, st_name in _DTYPES.items():
        if st_name == st:
            return np.dtype(getattr(ml_dtypes, np_name, np_name))
    raise CorruptCheckpointError(f"tensor {name!r} has safetensors dtype {st}, not read here")


def _tensor_reader(
    storage: Storage, path: str, start: int, shape: tuple[int, ...], dtype: np.dtype
) -> Callable[..., np.ndarray]:
    """Reads a tensor at byte ``start`` of a file: whole, or the region ``box``
    (``_read_region``: nothing held but the region and at most a block of rows)."""

    def read(box: Box | None = None) -> np.ndarray:
        box = tuple((0, n) for n in shape) if box is None else tuple(box)
        out = np.empty([max(b - a, 0) for a, b in box], dtype)
        if out.nbytes:
            _read_region(storage, path, start, shape, box, out)
        return out

    return read


def _read_into(storage: Storage, path: str, offset: int, buf: memoryview) -> None:
    """``buf`` from ``path`` at ``offset``, in pieces the storage reads in parallel (one thread
    reads a cold local file at about a third of what several do)."""
    piece = int(knobs.CHUNK_BYTES)  # pieces in a row: the storage joins them into runs
    reads = [RangeRead(path, offset + i, buf[i : i + piece]) for i in range(0, len(buf), piece)]
    storage.read_ranges(reads)


def _read_region(
    storage: Storage, path: str, at: int, shape: tuple[int, ...], box: Box, out: np.ndarray
) -> None:
    """Fill ``out`` (C-contiguous) with the region ``box`` of the array of ``shape`` at byte
    ``at``: one ranged read when the region is contiguous (whole in every axis after its
    first); else its rows read a block (``CONVERT_BLOCK_BYTES``) at a time and cut, or, when
    one row is bigger than a block, each row's region in turn. A block of a transposed weight
    (a band of columns: every row crosses it) so never reads the whole tensor at once."""
    if not shape or all(b - a == n for (a, b), n in zip(box[1:], shape[1:])):
        row = math.prod(shape[1:]) * out.dtype.itemsize
        offset = at + (box[0][0] * row if shape else 0)
        _read_into(storage, path, offset, memoryview(out.reshape(-1).view(np.uint8)))
        return
    (r0, r1), rest = box[0], box[1:]
    row = math.prod(shape[1:]) * out.dtype.itemsize
    limit = int(knobs.CONVERT_BLOCK_BYTES)
    if row > limit:
        for r in range(r0, r1):
            _read_region(storage, path, at + r * row, shape[1:], rest, out[r - r0])
        return
    step = max(1, limit // row)
    cut = tuple(slice(a, b) for a, b in rest)
    for r in range(r0, r1, step):
        rows = np.empty((min(step, r1 - r), *shape[1:]), out.dtype)
        _read_into(storage, path, at + r * row, memoryview(rows.reshape(-1).view(np.uint8)))
        out[r - r0 : r - r0 + len(rows)] = rows[(slice(None), *cut)]
