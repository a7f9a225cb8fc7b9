"""An Orbax checkpoint read through orbax-checkpoint itself (the optional extra
``stepsafe[orbax]``), leaf by leaf: its tree from Orbax's metadata (no array bytes); its arrays
through tensorstore, opened with the specs Orbax builds for them (``orbax_regions``: whole or
by region, holding about an array, not Orbax's two copies); its other leaves (Python scalars,
strings), and any array tensorstore cannot open, by one partial restore in which every other
leaf is Orbax's ``PLACEHOLDER``, so reading a subtree never reads the rest. OCDBT, zarr2/zarr3
and the buckets tensorstore reaches are Orbax's business; nothing here parses its files.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from stepsafe import knobs
from stepsafe.checkpoint.orbax_locate import OrbaxStep
from stepsafe.checkpoint.orbax_regions import ArraySpec, OrbaxRegions, StoreError
from stepsafe.errors import CorruptCheckpointError, UnsupportedFormatError
from stepsafe.format.manifest import Box
from stepsafe.tree import flatten, join

EXTRA = "pip install 'stepsafe[orbax]'"
log = logging.getLogger("stepsafe")


def import_orbax(what: str) -> Any:
    """``orbax.checkpoint``, imported now (it imports JAX: seconds, so only when needed).

    Raises:
        UnsupportedFormatError: orbax-checkpoint is not installed; the message names the extra.
    """
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise UnsupportedFormatError(
            f"{what} needs orbax-checkpoint, which is not installed: {EXTRA}"
        ) from e
    return ocp


class OrbaxCheckpoint:
    """One Orbax PyTree item, opened: ``structure`` and ``paths`` (stepsafe's key paths, so
    ``select`` and targets work as for stepsafe's checkpoints), ``arrays`` (key -> shape,
    dtype), the keys of inline ``values`` (Python scalars, strings, None), and ``read``."""

    def __init__(self, found: OrbaxStep):
        self.found = found
        self.path = found.path
        self._ocp = ocp = import_orbax(f"{found.item} is an Orbax checkpoint: reading it")
        from etils import epath

        item = found.item if "://" in found.item else os.path.abspath(found.item)
        if "://" not in item:
            _check_regular(item)
        self._dir = epath.Path(item)  # Orbax refuses relative paths
        self._handler = ocp.PyTreeCheckpointHandler()
        try:
            meta = self._handler.metadata(self._dir)
        except Exception as e:  # Orbax's and tensorstore's own errors, whatever their class
            raise CorruptCheckpointError(
                f"{found.item}: orbax-checkpoint cannot read its metadata: {_first_line(e)}"
            ) from e
        self._tree = getattr(meta, "tree", meta)
        flat = flatten(self._tree, is_leaf=self._is_meta)
        self.structure = flat.structure
        self.paths: list[str] = flat.paths
        self.arrays: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._kinds: dict[str, str] = {}
        specs: dict[str, ArraySpec] = {}
        for key, m in zip(flat.paths, flat.leaves):
            kind = self._kind(m)
            self._kinds[key] = kind
            if kind == "array":
                self.arrays[key] = shape, dtype = tuple(int(n) for n in m.shape), np.dtype(m.dtype)
                if isinstance(getattr(m, "name", None), str):  # else: Orbax's restore reads it
                    chunk = getattr(getattr(m, "storage", None), "chunk_shape", None)
                    chunk = tuple(int(n) for n in chunk) if chunk is not None else None
                    specs[key] = ArraySpec(m.name, shape, dtype, chunk)
        self._values: dict[str, Any] | None = None
        self.use_zarr3 = bool(getattr(meta, "use_zarr3", False))
        self._regions = OrbaxRegions(ocp, self._dir, specs, self.use_zarr3, found.item)

    # -- what it holds ---------------------------------------------------------------------
    @property
    def step(self) -> int | None:
        return self.found.step

    @property
    def custom_metadata(self) -> dict[str, Any]:
        custom = self.found.record.get("custom_metadata")
        return dict(custom) if isinstance(custom, dict) else {}

    @property
    def values(self) -> dict[str, Any]:
        """The inline leaves (Python scalars, strings, None), read once, all together."""
        if self._values is None:
            keys = [k for k in self.paths if self._kinds[k] != "array"]
            self._values = self.read(keys)
        return self._values

    def nbytes(self, key: str) -> int:
        shape, dtype = self.arrays[key]
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def chunk_bytes(self, key: str) -> int | None:
        """Bytes of one stored chunk of array ``key`` (the least a read of it decodes and
        holds), or None when Orbax's metadata does not say or tensorstore does not read it."""
        return self._regions.chunk_bytes(key) if key in self._regions.specs else None

    def regions_pay(self, key: str, boxes: Sequence[Box]) -> bool:
        """Whether reading array ``key`` as the regions ``boxes`` (that tile it) decodes its
        stored chunks about once (at most 1.5 times over on the whole: the chunks on the
        regions' edges twice): not so for chunks that span several regions (one chunk for the
        array, a numpy array's save; chunks cut along other axes than the regions), which
        each region would decode again, and hold."""
        if key not in self._regions.specs:
            return False
        decoded = self._regions.decoded(key, boxes)
        return decoded is not None and 2 * decoded <= 3 * math.prod(self.arrays[key][0])

    # -- reading ---------------------------------------------------------------------------
    def read_array(self, key: str, budget: int | None = None) -> np.ndarray:
        """One array, as numpy (bit for bit as saved); ``budget``: see ``read``."""
        return self.read([key], budget)[key]

    def read_box(self, key: str, box: Box, budget: int | None = None) -> np.ndarray:
        """The region ``box`` (``((start, stop), ..)``) of array ``key``, read by pieces of
        whole chunks of about ``budget`` bytes (twice the region's, ``ORBAX_PIECE_BYTES`` at
        most: a region that cuts across chunks, a layer of a stacked array, decodes about that
        at a time); what tensorstore cannot read is read whole by Orbax's restore and cut.

        Raises:
            CorruptCheckpointError: it could not be read, or not as Orbax's metadata says.
        """
        if budget is None:
            itemsize = self.arrays[key][1].itemsize
            wanted = 2 * math.prod(b - a for a, b in box) * itemsize
            budget = min(knobs.ORBAX_PIECE_BYTES, wanted)
        if key in self._regions.specs:
            try:
                return self._regions.read_box(key, box, budget)
            except StoreError as e:
                self._fell_back([key], e)
        whole = self._restore({key})[key]
        return np.ascontiguousarray(whole[tuple(slice(a, b) for a, b in box)])

    def read(self, keys: Iterable[str], budget: int | None = None) -> dict[str, Any]:
        """The leaves ``keys`` (arrays as numpy, values as saved): the arrays through
        tensorstore (an array of chunks bigger than ``budget`` bytes, by default
        ``knobs.ORBAX_PIECE_BYTES``, by pieces of about that into one array, which holds
        about the array and a piece), the rest by one Orbax restore that reads nothing else.

        Raises:
            CorruptCheckpointError: they could not be read, or an array came out of another
                shape or dtype than Orbax's metadata says.
        """
        want = set(keys)
        out: dict[str, Any] = {k: None for k in want if self._kinds.get(k) == "none"}
        arrays = sorted(k for k in want if k in self._regions.specs)
        if arrays:
            try:
                out.update(self._regions.read(arrays, budget or knobs.ORBAX_PIECE_BYTES))
            except StoreError as e:
                self._fell_back(arrays, e)
        todo = want - set(out)
        if todo:
            out.update(self._restore(todo))
        return out

    def _fell_back(self, keys: list[str], e: StoreError) -> None:
        log.warning("%s; reading %s by orbax-checkpoint's restore instead", e, _few(keys))

    def _restore(self, todo: set[str]) -> dict[str, Any]:
        """The leaves ``todo`` by one Orbax partial restore (every other leaf a placeholder).

        Raises:
            CorruptCheckpointError: Orbax could not read them, or made an array of another
                shape or dtype than its metadata says.
        """
        out: dict[str, Any] = {k: None for k in todo if self._kinds.get(k) == "none"}
        todo = todo - set(out)
        if not todo:
            return out
        ocp, tu = self._ocp, _tree_util()
        placeholder = ocp.PLACEHOLDER

        def pick(kp: Any, m: Any) -> Any:
            return m if _key(kp) in todo else placeholder

        item = tu.tree_map_with_path(pick, self._tree, is_leaf=self._is_meta)
        args = tu.tree_map(self._restore_arg, item, is_leaf=lambda x: x is placeholder)
        try:
            restored = self._handler.restore(
                self._dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args)
            )
        except Exception as e:  # Orbax's and tensorstore's own errors, whatever their class
            raise CorruptCheckpointError(
                f"{self.found.item}: orbax-checkpoint could not read {_few(sorted(todo))}: "
                f"{_first_line(e)}"
            ) from e
        leaves, _ = tu.tree_flatten_with_path(restored, is_leaf=lambda x: x is placeholder)
        for kp, value in leaves:
            key = _key(kp)
            if key in todo:
                out[key] = self._checked(key, value)
        missing = todo - set(out)
        if missing:
            raise CorruptCheckpointError(
                f"{self.found.item}: orbax-checkpoint returned no value for {_few(sorted(missing))}"
            )
        return out

    def close(self) -> None:
        self._regions.close()
        close = getattr(self._handler, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> OrbaxCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------
    def _is_meta(self, x: Any) -> bool:
        md = self._ocp.metadata
        return x is None or isinstance(x, md.ArrayMetadata | md.ScalarMetadata | md.StringMetadata)

    def _kind(self, m: Any) -> str:
        md = self._ocp.metadata
        if m is None:
            return "none"
        if isinstance(m, md.StringMetadata):
            return "string"
        if isinstance(m, md.ScalarMetadata):
            return "scalar"
        return "array"

    def _restore_arg(self, m: Any) -> Any:
        ocp = self._ocp
        if m is ocp.PLACEHOLDER:
            return m
        kind = self._kind(m)
        if kind == "string":
            return ocp.RestoreArgs(restore_type=str)
        if kind == "scalar":
            return ocp.RestoreArgs()  # the Python scalar saved
        return ocp.RestoreArgs(restore_type=np.ndarray)  # never onto devices: numpy, whole

    def _checked(self, key: str, value: Any) -> Any:
        if key not in self.arrays:
            return value
        shape, dtype = self.arrays[key]
        a = np.asarray(value)
        if a.shape != shape or a.dtype != dtype:
            raise CorruptCheckpointError(
                f"{self.found.item}: {key!r} read as {a.shape} {a.dtype}, its metadata says "
                f"{shape} {dtype}"
            )
        return a


def open_orbax(found: OrbaxStep) -> OrbaxCheckpoint:
    """``found`` opened for reading (orbax-checkpoint imported now).

    Raises:
        UnsupportedFormatError: orbax-checkpoint is not installed.
        CorruptCheckpointError: Orbax cannot read the item's metadata.
    """
    return OrbaxCheckpoint(found)


def _check_regular(item: str) -> None:
    """Refuse an item holding something other than files and directories (a FIFO, a device):
    Orbax and tensorstore would open it and wait forever.

    Raises:
        CorruptCheckpointError: naming the first such entry.
    """
    for root, _dirs, files in os.walk(item):
        for name in files:  # os.walk lists links, FIFOs and devices as files
            path = os.path.join(root, name)
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:
                continue  # a dangling link: Orbax's own error names it
            if not regular:
                raise CorruptCheckpointError(
                    f"{path} is not a regular file (a FIFO or device): Orbax never writes one; "
                    "remove it, or use another step"
                )


def _tree_util() -> Any:
    import jax

    return jax.tree_util


def _key(kp: Any) -> str:
    """A JAX key path as stepsafe's key path string (what ``flatten`` makes of it)."""
    path = ""
    for k in kp:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                path = join(path, str(getattr(k, attr)))
                break
        else:
            path = join(path, str(k))
    return path


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (f" and {len(keys) - n} more" * (len(keys) > n))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"
