"""Conversions (issue #15) against the disk's copy speed and the libraries' own load + save:
``.venv/bin/python benchmarks/convert.py --snapshot`` (or ``python -m benchmarks.convert``).

The source is a training checkpoint of ``--state`` (l4g: ~4 GB) with MaxText's layout: its
per-layer weights stacked under ``params/decoder/layers`` along axis 1 (``[emb, L, ..]``,
MaxText's ``param_scan_axis``), Adam's ``mu`` and ``nu`` alike. ``states.py``'s states keep
``layer_00`` .. apart, which has nothing to unstack: the same leaves, stacked, are the same
bytes in fewer, larger arrays. Saved once with ``stepsafe.save``; then, ``--repeats`` times,
each case in a fresh process with the page cache dropped before it (``fsutil``):

1. ``copy-user`` / ``copy-kernel``: every file of the source read once and written once to a
   new file, fsynced (user space: ``readinto`` + ``write`` through a 16 MiB buffer, the path
   a converter's bytes take; kernel: ``sendfile``, no copy through user space). The faster
   median is the copy baseline: reading plus writing the bytes once.
2. ``param-only``: ``convert_checkpoint(param_only=True, unstack=True, scan_axis=1)``.
3. ``unstack``: the whole state, ``convert_checkpoint(unstack=True, scan_axis=1)``.
4. ``param-only-stacked``: ``convert_checkpoint(param_only=True)``, nothing unstacked: the
   reader and writer alone, to tell their cost from the unstacking's.
5. ``to-safetensors``: ``export_safetensors`` of the params as a Hugging Face model directory,
   each stacked weight unstacked to per-layer names (``convert_fns.to_hf``, lazy).
6. ``from-safetensors``: ``import_safetensors`` of that directory (written once, beside the
   source, by stepsafe's exporter) into a param-only checkpoint, the layers stacked back
   (``convert_fns.from_hf``, lazy).
7. ``safetensors-load+save``: the peer of 6: ``safetensors.numpy.load_file`` of every file,
   stacked with numpy, ``stepsafe.save`` of the tree (the whole model in memory).
8. ``param-only-blocks``: 4 with ``STEPSAFE_CONVERT_BLOCK_BYTES`` at 64 MiB: arrays made block
   by block where the source reads regions (diagnosis: does the peak fall below an array?).
9. ``to-orbax``: ``export_orbax(param_only=True)``: the params as an Orbax checkpoint in
   MaxText's layout (``DST/0/items``, OCDBT + zarr3), written by orbax-checkpoint, which takes
   whole arrays: the params are held in memory while Orbax writes them.
10. ``from-orbax``: ``convert_checkpoint(param_only=True)`` of an Orbax checkpoint of the same
   params (written once, untimed, by orbax-checkpoint's ``CheckpointManager`` as MaxText
   writes one, from the tree the source was saved from), read one leaf at a time.
11. ``orbax-restore``: the peer's half: orbax-checkpoint's own restore of that checkpoint
   (``CheckpointManager.restore``, every array as numpy; the whole tree in memory).
12. ``orbax-peer``: the peer of 9 and 10: that restore + orbax-checkpoint's own save of the
   tree to a new directory (``CheckpointManager.save``, synchronous), as MaxText
   (``convert_fns.orbax_*``); the restore's and the save's seconds apart too.
13. ``orbax-largest``: diagnosis: orbax-checkpoint's partial restore of the largest array
   alone (every other leaf ``PLACEHOLDER``), the floor of 10's peak through Orbax's reader.

Each case: seconds to committed (fsync included, as any save), its peak RSS over the process
after imports (Linux's peak reset; the Orbax cases after JAX's CPU backend is up too, as in a
MaxText process), its CPU seconds, and the machine's load. Conversions are checked once: the
layers unstacked (or stacked back), the optimizer state dropped or kept, a slice (or a stacked
array) bit for bit against the source; Orbax's outputs as orbax-checkpoint restores them.

Results: ``RESULTS-convert.md`` (``report/convert.py``); raw JSON under ``out/``.
"""

# ruff: noqa: E402
# (imports follow the fix of sys.path below)
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __name__ == "__main__" and Path(sys.path[0]).resolve() == HERE:
    # Run as a script: import ``benchmarks`` as a package; its modules must not shadow the
    # standard library's (benchmarks/profile.py would hide ``profile``).
    sys.path[0] = str(HERE.parent)

import argparse
import json
import os
import resource
import subprocess
import time
from collections import defaultdict
from typing import Any

import numpy as np

from benchmarks import clocks, fsutil, machine, memory, states

OUT = HERE / "out"
PACKAGES = (
    "stepsafe", "numpy", "ml_dtypes", "xxhash", "safetensors", "orbax-checkpoint", "tensorstore",
    "jax",
)  # fmt: skip
AXIS = 1  # MaxText's param_scan_axis
CASES = (
    "copy-user", "copy-kernel", "param-only", "unstack", "param-only-stacked", "to-safetensors",
    "from-safetensors", "safetensors-load+save", "param-only-blocks", "to-orbax", "from-orbax",
    "from-orbax-sharded", "orbax-restore", "orbax-peer", "orbax-largest",
)  # fmt: skip
HF_IN = ("from-safetensors", "safetensors-load+save")  # the cases that read the HF directory
ORBAX_IN = (
    "from-orbax",
    "from-orbax-sharded",
    "orbax-restore",
    "orbax-peer",
    "orbax-largest",
)  # ... that read the Orbax checkpoint
ORBAX = ("to-orbax", *ORBAX_IN)  # the cases that import orbax-checkpoint (and JAX)
ORBAX_STEP = 0  # the Orbax checkpoint's step, as MaxText's param-only ones
SHARDS = 8  # from-orbax-sharded's source: the params saved from 8 CPU devices, axis 0 sharded
SHARDED_SAVE = """
import sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import stepsafe
from benchmarks.convert_fns import orbax_save
mesh = Mesh(np.array(jax.devices()), ("fsdp",))
def put(a):
    spec = P("fsdp") if a.ndim and a.shape[0] % len(jax.devices()) == 0 else P()
    return jax.device_put(a, NamedSharding(mesh, spec))
params = jax.tree.map(put, stepsafe.restore(sys.argv[1], select="params"))
orbax_save({"params": params}, sys.argv[2], int(sys.argv[3]))
"""
BUFFER = 16 << 20
BLOCK_BYTES = 64 << 20  # param-only-blocks' STEPSAFE_CONVERT_BLOCK_BYTES
CASE_ENV = {"param-only-blocks": {"STEPSAFE_CONVERT_BLOCK_BYTES": str(BLOCK_BYTES)}}
HF_CHECKED = "model.decoder.layers.3.attn.q.kernel"  # a layer's weight in the HF directory


def stacked_specs(state: str) -> list[states.Spec]:
    """``state``'s leaves with each ``layer_<i>`` weight stacked on axis 1 under
    ``params/decoder/layers`` (and the same under ``opt_state/mu`` and ``nu``): MaxText's
    scanned layout, the same bytes as ``state``."""
    out: dict[states.Key, tuple[int, ...]] = {}
    layers: dict[states.Key, list[tuple[int, ...]]] = defaultdict(list)
    for spec in states.specs(state):
        top, *rest = spec.key
        prefix = (top, *rest[:1]) if top == "opt_state" else (top,)
        inner = spec.key[len(prefix) :]
        if inner[0].startswith("layer_"):
            layers[(*prefix, "decoder", "layers", *inner[1:])].append(spec.shape)
            out.setdefault((*prefix, "decoder", "layers", *inner[1:]), ())
        elif inner[0] == "embed":
            out[(*prefix, "token_embedder", *inner[1:])] = spec.shape
        else:
            out[(*prefix, "decoder", *inner)] = spec.shape
    for key, shapes in layers.items():
        first = shapes[0]
        out[key] = (*first[:AXIS], len(shapes), *first[AXIS:])
    return [states.Spec(k, s) for k, s in out.items()]


def build_source(state: str, path: Path, orbax: Path | None = None) -> dict[str, Any]:
    """Save the stacked training state at ``path``; its shapes, for the report. ``orbax``:
    also write its params there as orbax-checkpoint writes them (``<orbax>/0/items``, the
    Orbax cases' source), untimed but for the record."""
    import stepsafe

    specs = stacked_specs(state)
    rng = np.random.default_rng(0)
    tree = states.nest([(s.key, rng.random(s.shape, dtype=np.float32)) for s in specs])
    tree["step"] = states.STEP
    t0 = time.perf_counter()
    stepsafe.save(str(path), tree)
    secs = time.perf_counter() - t0
    made = {}
    if orbax is not None:
        made = {"orbax": write_orbax({"params": tree["params"]}, orbax)}
    del tree
    nbytes, files = fsutil.disk_usage(path)
    largest = max(specs, key=lambda s: s.nbytes)
    params = sum(s.nbytes for s in specs if s.key[0] == "params")
    return {
        "arrays": len(specs), "array_bytes": sum(s.nbytes for s in specs),
        "params_bytes": params, "largest": ["/".join(largest.key), list(largest.shape)],
        "largest_bytes": largest.nbytes, "on_disk": nbytes, "files": files, "save_s": secs,
        "layers_shapes": {"/".join(s.key): list(s.shape) for s in specs
                          if s.key[0] == "params" and "layers" in s.key}, **made,
    }  # fmt: skip


def write_orbax_sharded(src: Path, root: Path) -> dict[str, Any]:
    """The params of ``src`` saved by orbax-checkpoint from jax arrays sharded on axis 0 over
    ``SHARDS`` CPU devices, as an FSDP-sharded MaxText job saves them (a chunk per shard);
    in a process of its own (the device count is set before JAX starts)."""
    t0 = time.perf_counter()
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(HERE.parent)]))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={SHARDS}"}  # fmt: skip
    subprocess.run([sys.executable, "-c", SHARDED_SAVE, str(src), str(root), str(ORBAX_STEP)],
                   env=env, check=True)  # fmt: skip
    nbytes, count = fsutil.disk_usage(root)
    return {"on_disk": nbytes, "file_count": count, "seconds": time.perf_counter() - t0,
            "shards": SHARDS}  # fmt: skip


def write_orbax(tree: dict[str, Any], root: Path) -> dict[str, Any]:
    """``tree`` saved by orbax-checkpoint as MaxText saves (``convert_fns.orbax_save``)."""
    from benchmarks.convert_fns import orbax_save

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t0 = time.perf_counter()
    orbax_save(tree, str(root), ORBAX_STEP)
    nbytes, count = fsutil.disk_usage(root)
    return {"on_disk": nbytes, "file_count": count, "seconds": time.perf_counter() - t0}


# ---- one case, in a fresh process ----------------------------------------------------------


def _copy_user(src: Path, dst: Path) -> int:
    buf = bytearray(BUFFER)
    view, total = memoryview(buf), 0
    for f in fsutil.files_under(src):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "rb", buffering=0) as r, open(out, "xb", buffering=0) as w:
            while n := r.readinto(buf):
                chunk = view[:n]
                while chunk:
                    chunk = chunk[w.write(chunk) :]
                total += n
            os.fsync(w.fileno())
    return total


def _copy_kernel(src: Path, dst: Path) -> int:
    total = 0
    for f in fsutil.files_under(src):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "rb", buffering=0) as r, open(out, "xb", buffering=0) as w:
            size, done = os.fstat(r.fileno()).st_size, 0
            while done < size:
                done += os.sendfile(w.fileno(), r.fileno(), done, min(size - done, 1 << 30))
            os.fsync(w.fileno())
        total += size
    return total


def _dirs_synced(dst: Path) -> None:
    for root, _dirs, _files in os.walk(dst, topdown=False):
        fsutil.fsync_path(root)
    fsutil.fsync_path(dst.parent)


def _tensor_bytes(directory: Path) -> int:
    """The tensors' bytes in a Hugging Face directory's files (each file less its header)."""
    total = 0
    for f in directory.glob("*.safetensors"):
        with open(f, "rb") as r:
            total += f.stat().st_size - 8 - int.from_bytes(r.read(8), "little")
    return total


def _load_and_save(hf: Path, dst: Path) -> int:
    """The peer: every file read whole by the safetensors library, the layers stacked with
    numpy, the tree saved by ``stepsafe.save`` (the whole model in memory)."""
    from safetensors.numpy import load_file

    import stepsafe
    from benchmarks.convert_fns import from_hf_numpy

    flat: dict[str, np.ndarray] = {}
    for f in sorted(hf.glob("*.safetensors")):
        flat |= load_file(str(f))
    nbytes = sum(a.nbytes for a in flat.values())
    tree = {"params": from_hf_numpy(flat)}
    stepsafe.save(str(dst), tree)
    return nbytes


def _convert(case: str, src: Path, dst: Path) -> dict[str, Any]:
    from stepsafe.convert import convert_checkpoint

    done = convert_checkpoint(
        str(src), str(dst), param_only=case.startswith("param-only"),
        unstack=case in ("param-only", "unstack"), scan_axis=AXIS,
    )  # fmt: skip
    return {"bytes": done.nbytes, "layer_sets": done.layer_sets, "step": done.step}


HELD: dict[str, Any] = {}  # orbax-restore's (and orbax-largest's) tree, for its check


def _tree_bytes(node: Any) -> int:
    if isinstance(node, dict):
        return sum(_tree_bytes(v) for v in node.values())
    return int(getattr(node, "nbytes", 0))


def _orbax_case(case: str, src: Path, dst: Path, key: str | None) -> dict[str, Any]:
    from benchmarks.convert_fns import orbax_restore, orbax_save
    from stepsafe.convert.orbax_out import export_orbax

    if case == "to-orbax":
        done = export_orbax(str(src), str(dst), param_only=True)
        return {"bytes": done.nbytes, "step": done.step}
    if case in ("from-orbax", "from-orbax-sharded"):
        return _convert(case, src / str(ORBAX_STEP), dst)
    t0 = time.perf_counter()
    tree = orbax_restore(str(src), ORBAX_STEP, key if case == "orbax-largest" else None)
    info = {"bytes": _tree_bytes(tree), "restore_s": time.perf_counter() - t0}
    if case == "orbax-peer":
        info["restore_peak_rise"] = memory.peak()  # less rss_before, below
        t1 = time.perf_counter()
        orbax_save(tree, str(dst), ORBAX_STEP)
        info["save_s"] = time.perf_counter() - t1
    else:
        HELD["tree"] = tree
    return info


def _jax_ready() -> float:
    """Import orbax-checkpoint and start JAX's CPU backend before the clock, as in a MaxText
    process (both the stepsafe and the Orbax cases read and write through it); the seconds."""
    t0 = time.perf_counter()
    import jax
    import orbax.checkpoint  # noqa: F401

    import stepsafe.convert.orbax_out  # noqa: F401

    jax.devices()
    return time.perf_counter() - t0


def run_case(case: str, src: Path, dst: Path, key: str | None = None) -> dict[str, Any]:
    """One case, timed alone: imports done, peak reset, then the copy or the conversion.
    ``src``: the training checkpoint, or the Hugging Face directory for ``HF_IN``'s cases, or
    the Orbax checkpoints' directory for ``ORBAX_IN``'s; ``key``: orbax-largest's array."""
    import safetensors.numpy  # noqa: F401  (imports before the clock, as stepsafe's)

    import stepsafe.convert  # noqa: F401
    from benchmarks.convert_fns import from_hf, to_hf
    from stepsafe.convert.hf import export_safetensors, import_safetensors

    ready = _jax_ready() if case in ORBAX else None
    before = memory.rss()
    reset = memory.reset_peak()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    info: dict[str, Any]
    if case.startswith("copy"):
        nbytes = (_copy_user if case == "copy-user" else _copy_kernel)(src, dst)
        _dirs_synced(dst)
        info = {"bytes": nbytes}
    elif case == "to-safetensors":
        info = {"files_written": export_safetensors(str(src), str(dst), to_hf)}
    elif case == "from-safetensors":
        info = {"bytes": import_safetensors(str(src), str(dst), from_hf)}
    elif case == "safetensors-load+save":
        info = {"bytes": _load_and_save(src, dst)}
    elif case in ORBAX:
        info = _orbax_case(case, src, dst, key)
    else:
        info = _convert(case, src, dst)
    secs = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    rec = {"case": case, "seconds": secs, "cpu_s": cpu, "rss_before": before, **info}
    if ready is not None:
        rec["jax_ready_s"] = ready
    if "restore_peak_rise" in rec:
        rec["restore_peak_rise"] -= before
    rec |= {"peak_rise": memory.peak() - before, "peak_reset": reset, "ru_maxrss": memory.maxrss()}
    if case == "to-safetensors":
        rec["bytes"] = _tensor_bytes(dst)
    rec["on_disk"], rec["files"] = fsutil.disk_usage(dst) if dst.exists() else (0, 0)
    return rec


def check(case: str, src: Path, dst: Path, key: str | None = None) -> dict[str, Any]:
    """The conversion did what it says: layers unstacked (or stacked back), optimizer state
    dropped (param-only) or kept, one layer's slice (or a stacked array) equal bit for bit to
    the source's stacked array. ``src`` is the training checkpoint for every case."""
    from stepsafe.checkpoint.restore import open_checkpoint

    a = open_checkpoint(str(src))
    stacked = next(k for k in a.manifest.arrays if k.startswith("params") and "layers/" in k)
    expect = a.read_array(stacked)
    if case == "orbax-largest" and key:
        stacked, expect = key, a.read_array(key)
    if case in ("to-orbax", "orbax-restore", "orbax-peer", "orbax-largest"):
        return _check_orbax(case, dst, stacked, expect)
    if case == "to-safetensors":
        from safetensors import safe_open

        names: list[str] = []
        same = False
        for f in sorted(dst.glob("*.safetensors")):
            with safe_open(str(f), framework="numpy") as r:
                held = list(r.keys())
                if HF_CHECKED in held:
                    got = r.get_tensor(HF_CHECKED)
                    same = bool(np.array_equal(np.take(expect, 3, axis=AXIS), got))
            names += held
        return {
            "arrays_out": len(names), "layers_left": 0, "opt_state_out": 0,
            "checked": HF_CHECKED, "slice_bit_exact": same, "step_out": None,
        }  # fmt: skip
    b = open_checkpoint(str(dst))
    keys = set(b.manifest.arrays)
    if case.endswith("stacked") or case.endswith("blocks") or case in (*HF_IN, *ORBAX_IN):
        sliced = stacked
    else:
        sliced, expect = stacked.replace("/layers/", "/layers_3/"), np.take(expect, 3, axis=AXIS)
    same = bool(np.array_equal(expect, b.read_array(sliced)))
    return {
        "arrays_out": len(keys),
        "layers_left": sum("/layers/" in k for k in keys),
        "opt_state_out": sum(k.startswith("opt_state") for k in keys),
        "checked": sliced,
        "slice_bit_exact": same,
        "step_out": b.record.step,
    }


def _flat(node: Any, key: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for n, sub in node.items() for k, v in _flat(sub, f"{key}{n}/").items()}
    return {key.rstrip("/"): node}


def _check_orbax(case: str, dst: Path, stacked: str, expect: np.ndarray) -> dict[str, Any]:
    """An Orbax output (or the tree ``orbax-restore`` held) as orbax-checkpoint restores it:
    the stacked array bit for bit."""
    from benchmarks.convert_fns import orbax_restore

    held = case in ("orbax-restore", "orbax-largest")
    tree = HELD.pop("tree") if held else orbax_restore(str(dst), ORBAX_STEP)
    flat = {k: v for k, v in _flat(tree).items() if isinstance(v, np.ndarray)}
    got = flat.get(stacked)
    return {
        "arrays_out": len(flat),
        "layers_left": sum("/layers/" in k for k in flat),
        "opt_state_out": sum(k.startswith("opt_state") for k in flat),
        "checked": stacked,
        "slice_bit_exact": got is not None and bool(np.array_equal(expect, np.asarray(got))),
        "step_out": None if held else ORBAX_STEP,
        "numpy_out": isinstance(got, np.ndarray),
    }


def source_reads_regions(src: Path) -> bool:
    """Whether the code measured reads regions of the source's arrays (``OutLeaf.box``): the
    blocks of ``CONVERT_BLOCK_BYTES`` take effect only then."""
    from stepsafe.convert.lazy_leaf import OutLeaf
    from stepsafe.convert.source import open_source, source_tree

    found: list[bool] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                visit(v)
        elif isinstance(node, OutLeaf):
            found.append(node.box is not None)

    visit(source_tree(open_source(str(src))))
    return any(found)


def child(a: argparse.Namespace) -> None:
    read = a.hf if a.case in HF_IN else a.orbax if a.case in ORBAX_IN else a.src
    if a.case == "from-orbax-sharded":
        read = a.orbax_sharded
    rec = run_case(a.case, Path(read), Path(a.dst), a.key)
    if a.case == "param-only-blocks":
        rec["source_regions"] = source_reads_regions(Path(a.src))
    if a.check and not a.case.startswith("copy"):
        rec |= check(a.case, Path(a.src), Path(a.dst), a.key)
    Path(a.json).write_text(json.dumps(rec))


# ---- the orchestrator -------------------------------------------------------------------------


def write_hf(src: Path, hf: Path) -> dict[str, Any]:
    """The Hugging Face directory the ``HF_IN`` cases read, written once by stepsafe's
    exporter (as ``to-safetensors`` writes it), untimed."""
    from benchmarks.convert_fns import to_hf
    from stepsafe.convert.hf import export_safetensors

    t0 = time.perf_counter()
    files = export_safetensors(str(src), str(hf), to_hf)
    nbytes, count = fsutil.disk_usage(hf)
    return {"files": files, "on_disk": nbytes, "file_count": count,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def one(
    a: argparse.Namespace, case: str, repeat: int, src: Path, cold: str, hf: Path | None = None,
    orbax: Path | None = None, sharded: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    dst = a.scratch / f"out-{case}"
    fsutil.remove(dst)
    read = hf if case in HF_IN and hf else orbax if case in ORBAX_IN and orbax else src
    if case == "from-orbax-sharded" and sharded is not None:
        read = sharded
    fsutil.evict(read, cold)
    out = a.scratch / "case.json"
    cmd = [sys.executable, "-m", "benchmarks.convert", "--case", case, "--src", str(src),
           "--dst", str(dst), "--json", str(out)] + (["--check"] * (repeat == 0))  # fmt: skip
    if hf is not None:
        cmd += ["--hf", str(hf)]
    if orbax is not None:
        cmd += ["--orbax", str(orbax), "--key", a.largest]
    if sharded is not None:
        cmd += ["--orbax-sharded", str(sharded)]
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(HERE.parent)]))
    env = {**os.environ, **CASE_ENV.get(case, {}), "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    load = os.getloadavg()[0]
    c0 = clocks.now(None)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    spent = clocks.spent(c0, clocks.now(None))
    if p.returncode:
        rec = {"case": case, "error": (p.stderr or p.stdout)[-1500:]}
    else:
        rec = json.loads(out.read_text())
    rec |= {"repeat": repeat, "load1": load, **spent}
    fsutil.remove(dst)
    return rec


def _brief(rec: dict[str, Any]) -> str:
    if "error" in rec:
        return f"r{rec['repeat']} {rec['case']}: ERROR {rec['error']}"
    return (
        f"r{rec['repeat']} {rec['case']}: {rec['seconds']:.2f} s, "
        f"{rec['bytes'] / rec['seconds'] / 1e9:.2f} GB/s, peak rise "
        f"{rec['peak_rise'] / 2**20:.0f} MiB, load {rec['load1']:.1f}"
        + (f", bit-exact {rec['slice_bit_exact']}" if "slice_bit_exact" in rec else "")
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/convert.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--state", default="l4g", help="a state of benchmarks/states.py")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES), help="of " + ", ".join(CASES))
    p.add_argument("--snapshot", action="store_true",
                   help="measure stepsafe as committed at HEAD, not the working tree")  # fmt: skip
    p.add_argument("--results", default=None,
                   help="markdown (default: RESULTS-convert.md for an l4g run)")  # fmt: skip
    # one case (the orchestrator's children)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--dst", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--hf", help=argparse.SUPPRESS)
    p.add_argument("--orbax", help=argparse.SUPPRESS)
    p.add_argument("--orbax-sharded", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.case:
        return child(a)
    from benchmarks.report.convert import render

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    results = a.results or str(
        HERE / "RESULTS-convert.md" if a.state == "l4g" else OUT / f"convert-{stamp}.md"
    )
    a.scratch = OUT / "scratch" / f"convert-{stamp}"
    a.scratch.mkdir(parents=True)
    run: dict[str, Any] = {
        "stamp": stamp,
        "command": "benchmarks/convert.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "state": a.state, "repeats": a.repeats, "axis": AXIS,
        "machine": machine.describe(str(OUT)), "versions": machine.versions(PACKAGES),
        "stepsafe_source": machine.snapshot_head(OUT) if a.snapshot else machine.stepsafe_source(),
        "load_at_start": os.getloadavg(), "records": [],
    }  # fmt: skip
    t0 = time.monotonic()
    try:
        src = a.scratch / "src" / str(states.STEP)
        cases = a.cases.split(",")
        orbax = a.scratch / "orbax" if any(c in ORBAX_IN for c in cases) else None
        run["source"] = build_source(a.state, src, orbax)
        a.largest = run["source"]["largest"][0]
        run["cold"] = cold = fsutil.cold_method()
        print(f"source: {run['source']['on_disk'] / 1e9:.2f} GB on disk, saved in "
              f"{run['source']['save_s']:.1f} s; cold: {cold}", flush=True)  # fmt: skip
        if made := run["source"].get("orbax"):
            print(f"Orbax checkpoint: {made['on_disk'] / 1e9:.2f} GB in {made['file_count']} "
                  f"files, {made['seconds']:.1f} s", flush=True)  # fmt: skip
        sharded = None
        if "from-orbax-sharded" in cases:
            sharded = a.scratch / "orbax-sharded"
            run["source"]["orbax_sharded"] = made = write_orbax_sharded(src, sharded)
            print(f"Orbax checkpoint saved from {SHARDS} devices: "
                  f"{made['on_disk'] / 1e9:.2f} GB in {made['file_count']} files, "
                  f"{made['seconds']:.1f} s", flush=True)  # fmt: skip
        hf = None
        if any(c in HF_IN for c in cases):
            hf = a.scratch / "hf"
            run["hf"] = write_hf(src, hf)
            made = run["hf"]
            print(f"Hugging Face directory: {made['on_disk'] / 1e9:.2f} GB in "
                  f"{made['file_count']} files, {made['seconds']:.1f} s", flush=True)  # fmt: skip
        for r in range(a.repeats):
            for case in cases:
                run["records"].append(one(a, case, r, src, cold, hf, orbax, sharded))
                print(_brief(run["records"][-1]), flush=True)
    finally:
        fsutil.remove(a.scratch)
    run["wall_s"] = time.monotonic() - t0
    run["load_at_end"] = os.getloadavg()
    machine.finish_run(run, OUT / f"convert-{stamp}.json", results, render,
                       source_may_change=not a.snapshot)  # fmt: skip


if __name__ == "__main__":
    main()
