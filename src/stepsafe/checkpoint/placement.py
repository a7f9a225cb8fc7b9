"""Where a restored JAX array goes: the target's sharding, or, for a target that names none,
a rule that never lands a sharded job's array on one device per process."""

from __future__ import annotations

from typing import Any

from stepsafe.errors import TargetMismatchError


def target_sharding(key: str, target: Any, saved: dict | None = None) -> Any:
    """The sharding to restore onto; None (JAX's default placement, uncommitted) when the target
    is an uncommitted array, so that it can still be combined with arrays on other devices.
    A ``jax.ShapeDtypeStruct`` without a sharding: see ``default_sharding`` (``saved``: the
    manifest's record of the array's sharding when it was saved)."""
    if getattr(target, "committed", True) is False:
        return None
    sharding = getattr(target, "sharding", None)
    return default_sharding(key, saved) if sharding is None else sharding


def default_sharding(key: str, saved: dict | None) -> Any:
    """Where an array goes whose target names no sharding. One process: None, JAX's default
    device, as always. Several processes: one device would hold the array in each process,
    which is never what a sharded job means, so the array goes onto the sharding it was saved
    with, rebuilt on all of this job's devices, when their number is the saved mesh's size.

    Raises:
        TargetMismatchError: several processes, and the array was saved with no mesh, or on a
            mesh of another size than this job's devices.
    """
    from stepsafe.distributed import process_count

    count = process_count()
    if count == 1:
        return None
    from stepsafe.arrays.jax_arrays import sharding_from_saved

    sharding = None if saved is None else sharding_from_saved(saved)
    if sharding is not None:
        return sharding
    import jax

    devices = jax.device_count()
    if saved is None:
        was = "was saved without a device mesh (a host array or value, or an older stepsafe)"
    else:
        mesh = saved["mesh"]
        sizes = ", ".join(f"{n}={k}" for n, k in zip(mesh["axis_names"], mesh["shape"]))
        was = f"was saved on mesh ({sizes}), and this job has {devices} devices"
    raise TargetMismatchError(
        f"{key!r}: the target has no sharding and this is one of {count} JAX processes, but "
        f"the array {was}: pass a target with a sharding "
        "(jax.ShapeDtypeStruct(shape, dtype, sharding=...) or a jax.Array)"
    )
