"""jax.Arrays sharded over 4 CPU devices: saved shard by shard, restored onto any sharding."""

from __future__ import annotations

import time

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import stepsafe  # noqa: E402
from stepsafe.format import CheckpointReader  # noqa: E402
from stepsafe.storage.local import LocalStorage  # noqa: E402

SPECS = [
    P(),
    P("data"),
    P(None, "model"),
    P("data", "model"),
    P("model", "data"),
    P(("data", "model")),
]


def sharded(mesh, spec, shape=(8, 12), dtype=jnp.float32, seed=0):
    x = jax.random.normal(jax.random.key(seed), shape).astype(dtype)
    return jax.device_put(x, NamedSharding(mesh, spec))


@pytest.mark.parametrize("save_spec", SPECS, ids=str)
@pytest.mark.parametrize("restore_spec", SPECS, ids=str)
def test_restore_onto_same_and_other_sharding(tmp_path, mesh, save_spec, restore_spec):
    x = sharded(mesh, save_spec)
    stepsafe.save(tmp_path / "c", {"x": x})
    want = NamedSharding(mesh, restore_spec)
    target = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=want)}
    out = stepsafe.restore(tmp_path / "c", target)["x"]
    assert isinstance(out, jax.Array) and out.sharding == want
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    for shard in out.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(x)[shard.index])


def test_sharded_array_is_saved_shard_by_shard_replicas_once(tmp_path, mesh):
    x = sharded(mesh, P("data"))  # 2 distinct shards, each replicated on 2 devices
    stepsafe.save(tmp_path / "c", {"x": x})
    with CheckpointReader(LocalStorage(), str(tmp_path / "c")) as reader:
        shards = reader.manifest.arrays["x"].shards
    assert sorted(s.index for s in shards) == [((0, 4), (0, 12)), ((4, 8), (0, 12))]
    assert sum(c.length for s in shards for c in s.chunks) == x.nbytes


def test_target_jax_array_takes_its_dtype_and_sharding(tmp_path, mesh):
    x = sharded(mesh, P("data", "model"))
    stepsafe.save(tmp_path / "c", {"x": x})
    like = sharded(mesh, P("model"), dtype=jnp.bfloat16, seed=1)
    out = stepsafe.restore(tmp_path / "c", {"x": like}, allow_cast=True)["x"]  # f32 -> bf16
    assert out.dtype == jnp.bfloat16 and out.sharding == like.sharding
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x.astype(jnp.bfloat16)))


def test_optax_train_state_round_trips_exactly(tmp_path, mesh):
    params = {
        "dense": {
            "kernel": sharded(mesh, P(None, "model")),
            "bias": jax.device_put(jnp.zeros(12), NamedSharding(mesh, P())),
        },
        "embed": sharded(mesh, P("data"), shape=(16, 4), dtype=jnp.bfloat16),
    }
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100))
    opt_state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)
    state = {"step": jnp.array(1, jnp.int32), "params": params, "opt_state": opt_state}
    stepsafe.save(tmp_path / "c", state)

    assert not opt_state[0].count.committed  # restoring onto it keeps it movable
    out = stepsafe.restore(tmp_path / "c", state)
    assert not out["opt_state"][0].count.committed
    _check_same_and_trains_alike(out, state, opt, grads)
    committed = jax.device_put(state, NamedSharding(mesh, P()))
    abstract = jax.tree.map(
        lambda a, c: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=a.sharding if a.committed else c.sharding
        ),
        state,
        committed,
    )
    _check_same_and_trains_alike(stepsafe.restore(tmp_path / "c", abstract), state, opt, grads)


def _check_same_and_trains_alike(out, state, opt, grads):
    assert jax.tree.structure(out) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(state)):
        assert a.dtype == b.dtype and (a.sharding == b.sharding or not b.committed)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the restored state keeps training exactly like the original
    u1, _ = opt.update(grads, out["opt_state"], out["params"])
    u2, _ = opt.update(grads, state["opt_state"], state["params"])
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_params_only_select_onto_sharded_target(tmp_path, mesh):
    params = {"w": sharded(mesh, P("data", "model"))}
    state = {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": 5}
    stepsafe.save(tmp_path / "c", state)
    target = {"w": jax.ShapeDtypeStruct((8, 12), jnp.float32, sharding=NamedSharding(mesh, P()))}
    out = stepsafe.restore(tmp_path / "c", target, select="params")
    assert list(out) == ["w"] and isinstance(out["w"], jax.Array)
    assert out["w"].sharding == target["w"].sharding != params["w"].sharding
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(params["w"]))
    other = NamedSharding(mesh, P("model", None))  # and onto a sharding of the other axes
    target = {"w": jax.ShapeDtypeStruct((8, 12), jnp.float32, sharding=other)}
    out = stepsafe.restore(tmp_path / "c", target, select="params")["w"]
    assert out.sharding == other
    for shard in out.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(params["w"])[shard.index])


def test_without_target_jax_arrays_come_back_as_numpy(tmp_path, mesh):
    x = sharded(mesh, P("data", "model"))
    stepsafe.save(tmp_path / "c", {"x": x, "s": jnp.float32(3)})
    out = stepsafe.restore(tmp_path / "c")
    assert isinstance(out["x"], np.ndarray)
    np.testing.assert_array_equal(out["x"], np.asarray(x))
    assert out["s"].shape == () and out["s"] == 3


def test_async_save_survives_donation_of_the_saved_buffers(tmp_path, mesh, monkeypatch):
    """An async save takes the caller's JAX arrays on the CPU without copying them (they are
    immutable), and the training step that donates them while the write is still to come (each
    file is written 0.2 s late) cannot change what is written: while the snapshot holds views of
    the buffers, JAX computes into new ones instead (``is_deleted`` stays False), and once the
    write is done the views are gone, so the next donation reuses the buffers (``is_deleted``).
    A numpy leaf changed in place before the write is saved as it was (numpy leaves are
    copied)."""
    from stepsafe.manager import CheckpointManager, ManagerOptions
    from stepsafe.storage.local import LocalTransaction

    real_write_file = LocalTransaction.write_file

    def slow_write_file(self, relpath, chunks):  # a slow disk: the bytes are read 0.2 s late
        time.sleep(0.2)
        return real_write_file(self, relpath, chunks)

    monkeypatch.setattr(LocalTransaction, "write_file", slow_write_file)
    state = {
        "w": sharded(mesh, P("data", "model")),
        "b": jnp.arange(1000.0),
        "host": np.arange(256, dtype=np.int64),
    }
    expected = jax.tree.map(np.array, state)

    @jax.jit
    def clobber(s):
        return jax.tree.map(lambda x: x * 0 - 7, s)

    clobber_donating = jax.jit(clobber, donate_argnums=0)
    m = CheckpointManager(str(tmp_path), ManagerOptions(save_interval_steps=1, async_save=True))
    m.save(1, state)
    state["host"][:] = -7  # the caller updates a host leaf in place, before the write
    donated = {k: state[k] for k in ("w", "b")}
    new = clobber_donating(donated)  # donates the saved buffers while the save still runs
    assert float(new["b"][0]) == -7
    assert not any(x.is_deleted() for x in donated.values()), "the save held no view"
    m.wait_until_finished()
    m.close()
    again = clobber_donating(donated)  # the save is done: nothing holds the buffers any more
    assert float(again["w"].ravel()[0]) == -7
    assert all(x.is_deleted() for x in donated.values()), "the save kept views of the buffers"
    out = stepsafe.restore(tmp_path / "1")
    for k in expected:
        np.testing.assert_array_equal(out[k], expected[k])
