"""Adversarial checks of async saves that take JAX arrays on the CPU as views (no copy), of the
bulk-mapped host buffers numpy leaves are copied into, and of the faster manifest parser.

What an async save promises: the checkpoint holds the state as it was when ``save`` returned,
whatever the caller does to its arrays while the write runs, within JAX's rules (a jax.Array is
immutable: memory shared with torch or numpy through DLPack and changed in place is outside
them, as in Orbax, and the README says so). Every break the review found is fixed and kept
here as a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import stepsafe  # noqa: E402
from stepsafe.checkpoint.save import snapshot  # noqa: E402
from stepsafe.errors import ManifestError  # noqa: E402
from stepsafe.format.manifest import Manifest  # noqa: E402
from stepsafe.manager import CheckpointManager, ManagerOptions  # noqa: E402
from stepsafe.storage.local import LocalTransaction  # noqa: E402


@pytest.fixture
def slow_disk(monkeypatch):
    """Every file of a save is written 0.2 s late: the caller runs on meanwhile."""
    real = LocalTransaction.write_file

    def slow(self, relpath, chunks):
        time.sleep(0.2)
        return real(self, relpath, chunks)

    monkeypatch.setattr(LocalTransaction, "write_file", slow)


def _restore_only_step(root: Path) -> dict:
    """The one committed step under ``root`` (a manager's directory or its local tier)."""
    found = sorted(p.parent for p in root.rglob("_CHECKPOINT_METADATA"))
    assert len(found) == 1, found
    return stepsafe.restore(str(found[0]))


# -- JAX arrays that alias memory the caller changes -----------------------------------------


def test_jnp_asarray_of_numpy_is_a_copy_so_the_snapshot_holds():
    """Held: ``jnp.asarray(numpy)`` on the CPU copies (asynchronously: a write before the
    transfer completes races inside JAX, not stepsafe), so a later in-place update of the
    numpy array does not reach the snapshot."""
    buf = np.arange(1 << 20, dtype=np.float32)
    x = jnp.asarray(buf)
    snap = snapshot({"w": x}, copy=True)
    buf *= -1
    ((_, data),) = snap.arrays[0].shards
    np.testing.assert_array_equal(np.asarray(data), np.arange(1 << 20, dtype=np.float32))


def test_numpy_views_of_jax_arrays_cannot_be_made_writable():
    """Held: ``np.asarray(x)`` of a jax.Array is read-only and numpy refuses to make it
    writable, and ``np.from_dlpack(x)`` is read-only too: numpy gives no way into the buffer
    the snapshot views."""
    x = jnp.arange(1 << 12, dtype=jnp.float32) + 0
    with pytest.raises(ValueError):
        np.asarray(x).setflags(write=True)
    with pytest.raises(ValueError):
        np.from_dlpack(x)[0] = 1


# -- JAX's own arrays: donation and deletion during the write (checks that held) -------------


DTYPES = [jnp.bfloat16, jnp.bool_, jnp.int4, jnp.float8_e4m3fn, jnp.int8, jnp.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_donation_and_delete_during_the_write_save_the_state_bit_exact(
    tmp_path, mesh, slow_disk, dtype
):
    """Held: arrays over a mesh with replicas (sharded on one axis, replicated on the other),
    replicated arrays, 0-d and empty arrays of narrow dtypes, donated to a jit and deleted
    while the write runs, are saved bit-exact; once the write is done nothing holds the saved
    buffers (a donation of an array saved but not donated meanwhile reuses them). (A replicated
    array donated during the write ends half donated: the replica the snapshot views is kept,
    the others are reused, and ``is_deleted`` says False; calling a jit on it again then fails
    inside XLA, once a segfault: using a donated array is the caller's error, not a loss.)"""
    base = jax.random.normal(jax.random.key(0), (8, 12)) * 4
    state = {
        "rep": jax.device_put(base.astype(dtype), NamedSharding(mesh, P("data", None))),
        "all": jax.device_put(base[:3].astype(dtype), NamedSharding(mesh, P())),
        "s": jnp.asarray(base[0, 0]).astype(dtype),  # made by JAX: no caller memory
        "e": jnp.zeros((0, 5), dtype),
        "gone": (base[1] + 1).astype(dtype),
        "later": jax.device_put(base.astype(dtype), NamedSharding(mesh, P("data", "model"))),
    }
    expected = {k: np.array(v) for k, v in state.items()}
    m = CheckpointManager(str(tmp_path), ManagerOptions(save_interval_steps=1, async_save=True))
    m.save(1, state)
    clobber = jax.jit(  # reads its input (x * 0 of ints folds to a constant, using nothing)
        lambda s: jax.tree.map(lambda x: jnp.flip(x) if x.ndim else x, s), donate_argnums=0
    )
    donated = {k: state[k] for k in ("rep", "all", "s")}
    clobber(donated)
    state["gone"].delete()
    m.wait_until_finished()
    m.close()
    out = _restore_only_step(tmp_path)
    for k, v in expected.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert out[k].tobytes() == v.tobytes(), k
    kept = {"later": state["later"]}
    clobber(kept)  # the write is done: nothing may hold the saved buffers any more
    assert all(x.is_deleted() for x in kept.values()), "the save kept views of the buffers"


def test_async_save_of_a_column_major_layout_is_exact(tmp_path, slow_disk):
    """Held: a jax.Array with a non-default (column-major) layout, whose host form is an
    F-ordered copy rather than a view, is saved and restored exactly by an async save."""
    from jax.experimental.layout import Format, Layout
    from jax.sharding import SingleDeviceSharding

    x = jnp.arange(12.0 * 16).reshape(12, 16)
    y = jax.device_put(x, Format(Layout(major_to_minor=(1, 0)), SingleDeviceSharding(x.device)))
    m = CheckpointManager(str(tmp_path), ManagerOptions(save_interval_steps=1, async_save=True))
    m.save(1, {"y": y})
    m.wait_until_finished()
    m.close()
    np.testing.assert_array_equal(_restore_only_step(tmp_path)["y"], np.asarray(x))


def test_a_failed_write_lets_go_of_the_views(tmp_path, monkeypatch):
    """Held: a write that fails (disk full) does not keep views of the saved arrays alive
    through its error, so the training step's donations still reuse buffers."""

    def full(self, relpath, chunks):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LocalTransaction, "write_file", full)
    x = jnp.arange(1 << 14, dtype=jnp.float32) + 1
    m = CheckpointManager(str(tmp_path), ManagerOptions(save_interval_steps=1, async_save=True))
    m.save(1, {"x": x})
    with pytest.raises(Exception, match="No space left"):
        m.wait_until_finished()
    monkeypatch.undo()
    m.close()
    jax.jit(lambda t: t * 0, donate_argnums=0)(x)
    assert x.is_deleted()


# -- bulk-mapped host buffers -----------------------------------------------------------------


def test_host_buffer_beyond_the_memory_limit_is_a_memory_error():
    """BREAK (smaller). ``storage.host_memory.empty`` maps big buffers with ``mmap``, which
    raises ``OSError(ENOMEM)`` where ``np.empty`` raised ``MemoryError``. An async save of a
    numpy state that does not fit in host memory (a container's address-space limit) now
    fails with an OSError that reads as a disk error, and a caller's ``except MemoryError``
    (fall back to a synchronous save, or save fewer leaves) no longer runs."""
    script = (
        "import resource, numpy as np\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "from stepsafe.storage.host_memory import empty\n"
        "try:\n"
        "    np.empty((4 << 30,), np.uint8)\n"
        "except MemoryError:\n"
        "    print('numpy: MemoryError')\n"
        "try:\n"
        "    empty((4 << 30,), np.uint8)\n"
        "except MemoryError:\n"
        "    print('empty: MemoryError')\n"
        "except OSError as e:\n"
        "    print('empty: OSError', e.errno)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "numpy: MemoryError" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "empty: MemoryError" in out.stdout, out.stdout + out.stderr[-2000:]


def test_host_buffers_survive_fork():
    """Held: a bulk-mapped snapshot buffer is private (MAP_PRIVATE): a child forked after
    mapping (a data-loader worker) writing into its copy changes nothing in the parent. (In a
    process of its own: forking this JAX process could deadlock.)"""
    script = (
        "import os, numpy as np\n"
        "from stepsafe import knobs\n"
        "knobs.BULK_MAP_BYTES = 64\n"
        "from stepsafe.storage.host_memory import copy_of\n"
        "a = copy_of(np.arange(1 << 12, dtype=np.int64))\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    a[:] = -1\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('parent sees', int(a[5]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "parent sees 5" in out.stdout, out.stdout + out.stderr[-2000:]


def test_both_tiers_let_go_of_the_views_after_the_write(tmp_path):
    """Held: with a local tier and the persistent tier both saving a step, once the writes
    are done nothing keeps views of the saved arrays (which would turn every later donation
    of them into a copy: twice the memory of the state, for good)."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    x = jax.device_put(jnp.arange(96.0).reshape(8, 12), NamedSharding(mesh, P("data", "model")))
    y = jnp.arange(1 << 12, dtype=jnp.float32) + 1
    options = ManagerOptions(
        save_interval_steps=1,
        async_save=True,
        local_directory=str(tmp_path / "local" / "run"),
        local_save_interval_steps=1,
    )
    m = CheckpointManager(str(tmp_path / "persistent"), options)
    m.save(1, {"x": x, "y": y})
    m.wait_until_finished()
    jax.jit(lambda s: jax.tree.map(lambda a: a[::-1], s), donate_argnums=0)({"x": x, "y": y})
    assert x.is_deleted() and y.is_deleted(), "a tier kept views of the saved buffers"
    m.close()


# -- manifests: forgeries the old parser refused ------------------------------------------------


def _manifest_doc(tmp_path: Path, mesh) -> tuple[dict, Path]:
    state = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "s": jax.device_put(jnp.arange(32.0).reshape(4, 8), NamedSharding(mesh, P("data"))),
        "z": np.zeros((0, 3), np.int8),
        "sc": np.float64(3.0),
    }
    stepsafe.save(str(tmp_path / "c"), state)
    (path,) = (tmp_path / "c").rglob("manifest.*.json")
    return json.loads(path.read_bytes()), path


def _forgeries(doc: dict) -> list[tuple[str, dict]]:
    """(what, forged manifest) pairs; every one must be refused."""
    out = []

    def forge(what, change):
        d = json.loads(json.dumps(doc))
        change(d["arrays"])
        out.append((what, d))

    forge("bool dim", lambda a: a["a"].__setitem__("shape", [True, 4]))
    forge("float dim", lambda a: a["a"].__setitem__("shape", [3.0, 4]))
    forge("negative dim", lambda a: a["a"].__setitem__("shape", [-3, 4]))
    forge("huge shape", lambda a: a["a"].__setitem__("shape", [1 << 40, 1 << 40]))
    forge("65 dims", lambda a: a["a"].__setitem__("shape", [1] * 65))
    forge("nested dim", lambda a: a["a"].__setitem__("shape", [[3], 4]))
    forge("shape a string", lambda a: a["a"].__setitem__("shape", "34"))
    forge("shape an int", lambda a: a["a"].__setitem__("shape", 12))
    forge("bool index", lambda a: a["a"]["shards"][0].__setitem__("index", [[False, 3], [0, 4]]))
    forge("index hi bool", lambda a: a["sc"].__setitem__("shape", [1]) or
          a["sc"]["shards"][0].__setitem__("index", [[0, True]]))  # fmt: skip
    forge("index triple", lambda a: a["a"]["shards"][0].__setitem__("index", [[0, 3, 1], [0, 4]]))
    forge("index short", lambda a: a["a"]["shards"][0].__setitem__("index", [[0, 3]]))
    forge("bool offset", lambda a: a["a"]["shards"][0]["chunks"][0].__setitem__(1, False))
    forge("no shards", lambda a: a["a"].__setitem__("shards", []))
    forge("whole twice", lambda a: a["a"]["shards"].append(a["a"]["shards"][0]))
    forge(
        "one shard twice, one missing",
        lambda a: a["s"]["shards"].__setitem__(1, a["s"]["shards"][0]),
    )
    forge("missing shape", lambda a: a["a"].pop("shape"))
    forge("missing chunks", lambda a: a["a"]["shards"][0].pop("chunks"))
    return out


def test_forged_manifests_are_refused_with_manifest_error(tmp_path, mesh):
    """Held (a differential run over 22k random forgeries found no manifest the old parser
    refused and the new one accepts): each of these targeted forgeries, notably bools where
    ints are expected, is refused with a ManifestError, never a raw exception."""
    doc, _ = _manifest_doc(tmp_path, mesh)
    Manifest.from_json(json.dumps(doc).encode(), "real")  # the unforged one parses
    for what, forged in _forgeries(doc):
        with pytest.raises(ManifestError):
            Manifest.from_json(json.dumps(forged).encode(), what)


# -- two JAX processes: replicas split between them, views of partial shards ------------------

TWO_PROCESS_ASYNC = """
import sys, time, numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stepsafe.manager import CheckpointManager, ManagerOptions
from stepsafe.storage.local import LocalTransaction
real = LocalTransaction.write_file
def slow(self, relpath, chunks):
    time.sleep(0.3)
    return real(self, relpath, chunks)
LocalTransaction.write_file = slow
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
def arr(k, shape, spec):
    x = (np.arange(np.prod(shape)) * 3 + k).astype(np.float32).reshape(shape)
    return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), lambda i: x[i])
state = {"cols": arr(1, (8, 16), P(None, "model")), "all": arr(2, (5, 7), P()),
         "rows": arr(3, (6, 9), P("model")), "grid": arr(4, (8, 16), P("data", "model"))}
m = CheckpointManager(sys.argv[1], ManagerOptions(save_interval_steps=1, async_save=True))
m.save(1, state)
clobber = jax.jit(lambda s: jax.tree.map(lambda x: jnp.flip(x) * -1, s), donate_argnums=0)
new = clobber(state)
jax.block_until_ready(new)
m.wait_until_finished()
m.close()
print("ok", flush=True)
"""


def test_two_processes_async_save_with_split_replicas_is_bit_exact(tmp_path):
    """Held: two JAX processes, arrays replicated across them (each process writes part of
    each replica: views cut out of a shard, not C-contiguous where the cut is across columns),
    donated by the next step while the slow write runs: the step restores bit-exact."""
    import jax_processes

    results = jax_processes.run(
        TWO_PROCESS_ASYNC, 2, args=lambda i, port: [str(tmp_path)], timeout_s=180
    )
    assert all(r.returncode == 0 for r in results), "\n".join(r.describe() for r in results)
    out = _restore_only_step(tmp_path)
    for k, (n, shape) in {"cols": (1, (8, 16)), "all": (2, (5, 7)), "rows": (3, (6, 9)),
                          "grid": (4, (8, 16))}.items():  # fmt: skip
        want = (np.arange(np.prod(shape)) * 3 + n).astype(np.float32).reshape(shape)
        assert out[k].tobytes() == want.tobytes(), k
