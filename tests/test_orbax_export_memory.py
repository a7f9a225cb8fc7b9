"""``export_orbax`` (``stepsafe convert --to orbax``) in bounded memory (#15 items 5 and 7): its
arrays are handed to orbax-checkpoint's writer one block at a time (a type handler of its
own, ``convert/orbax_out_stream.py``), never the whole tree, so its peak resident memory
stays within the largest array + 256 MiB; and what it writes is what orbax-checkpoint itself
restores bit for bit: big arrays stored in chunks of rows (as Orbax stores an array sharded by
rows), with or without Orbax's zstd, through ``StandardCheckpointer``, ``CheckpointManager``
(MaxText's) and ``PyTreeCheckpointHandler``.

The peak is the kernel's (``VmHWM``, reset after the imports through ``/proc/self/clear_refs``),
each export in a fresh process; the numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

ocp = pytest.importorskip("orbax.checkpoint")
import jax  # noqa: E402
import tensorstore as ts  # noqa: E402
from test_orbax_read import assert_bit_exact, orbax_restore, write_manager  # noqa: E402

import stepsafe  # noqa: E402
from stepsafe import knobs  # noqa: E402
from stepsafe.convert.orbax_out import export_orbax  # noqa: E402
from stepsafe.convert.orbax_out_stream import chunk_boxes  # noqa: E402
from stepsafe.errors import ChecksumMismatchError  # noqa: E402

MIB = 1 << 20


def state() -> dict:
    """Arrays bigger and smaller than the 4 KiB chunks the tests below set: rows that split
    evenly and not (7 rows of 3), a row bigger than a chunk (split along a later axis), bf16,
    ints, 0-d, a stacked [embed, layers, mlp] array (MaxText's scan axis 1), and values."""
    rng = np.random.default_rng(3)
    return {
        "params": {
            "decoder": {
                "layers": {
                    "wi": rng.standard_normal((16, 4, 40)).astype(ml_dtypes.bfloat16),
                    "wo": rng.standard_normal((40, 4, 16), np.float32),
                },
                "norm": rng.standard_normal(300, np.float32),
            },
            "embed": rng.standard_normal((7, 3, 100), np.float32),
            "wide": rng.standard_normal((2, 3000), np.float32),  # a row of 12000 bytes
            "ids": rng.integers(-(2**40), 2**40, (50, 33)),
            "scale": np.float32(0.5),
        },
        "step": 12,
    }


def zarr_codecs(item: Path, name: str, use_ocdbt: bool) -> list[str]:
    """The codecs tensorstore reads ``name``'s Zarr 3 metadata to have (inner ones too)."""
    kv: dict = {"driver": "file", "path": f"{item}/{name}/"}
    if use_ocdbt:
        kv = {"driver": "ocdbt", "base": {"driver": "file", "path": f"{item}/"}, "path": name}
    t = ts.open({"driver": "zarr3", "kvstore": kv}, open=True).result()
    found = []
    for codec in t.spec().to_json()["metadata"]["codecs"]:
        found.append(codec["name"])
        found += [c["name"] for c in codec.get("configuration", {}).get("codecs", [])]
    return found


@pytest.mark.parametrize(
    "use_ocdbt, use_zarr3, use_compression",
    [(True, True, False), (True, True, True), (False, True, False), (True, False, True),
     (False, False, False)],
)  # fmt: skip
def test_an_export_in_chunks_is_what_orbax_restores_bit_for_bit(
    tmp_path, monkeypatch, use_ocdbt, use_zarr3, use_compression
):
    monkeypatch.setattr(knobs, "ORBAX_CHUNK_BYTES", 4096)
    want = state()
    stepsafe.save(str(tmp_path / "run" / "checkpoints" / "12"), want)
    dst = tmp_path / "maxtext" / "checkpoints"
    done = export_orbax(
        str(tmp_path / "run"), str(dst), use_ocdbt=use_ocdbt, use_zarr3=use_zarr3,
        use_compression=use_compression,
    )  # fmt: skip
    assert done.nbytes == sum(np.asarray(a).nbytes for a in jax.tree.leaves(want["params"]))
    item = dst / "12" / "items"
    assert_bit_exact(orbax_restore(item), want)
    assert_bit_exact(ocp.StandardCheckpointer().restore(item), want)
    with ocp.CheckpointManager(str(dst), item_names=("items",)) as m:  # MaxText's
        back = m.restore(12, args=ocp.args.Composite(items=ocp.args.PyTreeRestore()))["items"]
    assert_bit_exact(back, want)
    # stored in chunks of rows, as Orbax records them
    meta = ocp.PyTreeCheckpointHandler().metadata(item).tree["params"]
    assert meta["embed"].storage.chunk_shape == (3, 3, 100)  # 3 + 3 + 1 rows
    assert meta["wide"].storage.chunk_shape == (1, 1000)
    assert meta["decoder"]["norm"].storage.chunk_shape == (300,)  # small: one chunk
    if use_zarr3:
        codecs = zarr_codecs(item, "params.embed", use_ocdbt)
        assert ("zstd" in codecs) == use_compression, codecs


def test_the_chunks_are_contiguous_runs_of_rows_of_about_the_limit():
    boxes = chunk_boxes((1536, 10, 4096), 4, 16 * MIB)
    assert len(boxes) == 16 and {b[0][1] - b[0][0] for b in boxes} == {96}  # evened out
    assert [b[0] for b in boxes[:2]] == [(0, 96), (96, 192)] and boxes[-1][0] == (1440, 1536)
    assert chunk_boxes((3, 5), 4, 8) == [
        ((i, i + 1), (a, b)) for i in range(3) for a, b in ((0, 2), (2, 4), (4, 5))
    ]
    assert chunk_boxes((), 4, 8) == [()] and chunk_boxes((2, 2), 4, 16) == [((0, 2), (0, 2))]


def test_an_unstacked_export_of_an_orbax_source_read_whole_is_bit_exact(tmp_path, monkeypatch):
    """An Orbax source array stored as one chunk is read whole (no regions): the export slices
    its blocks from it, and the unstacked layers of one stacked array are written together."""
    monkeypatch.setattr(knobs, "ORBAX_CHUNK_BYTES", 256)
    want = state()
    write_manager(tmp_path / "src", 12, want)
    dst = tmp_path / "out" / "checkpoints"
    done = export_orbax(str(tmp_path / "src"), str(dst), param_only=True, unstack=True)
    assert done.step == 0 and done.layer_sets == 1
    back = orbax_restore(dst / "0" / "items")["params"]["decoder"]
    layers = want["params"]["decoder"]["layers"]
    for i in range(4):
        assert_bit_exact(back[f"layers_{i}"], {k: np.take(v, i, axis=1) for k, v in layers.items()})


def test_a_source_array_failing_its_checksum_midway_commits_nothing(tmp_path, monkeypatch):
    """The source is read while Orbax writes: a damaged chunk of it is stepsafe's error (not
    Orbax's), after blocks of the array went out, and leaves no step and no temporary."""
    monkeypatch.setattr(knobs, "ORBAX_CHUNK_BYTES", 64 << 10)
    w = np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024)  # 4 MiB: 64 chunks
    stepsafe.save(str(tmp_path / "run" / "checkpoints" / "3"), {"w": w, "b": np.ones(3)})
    (data,) = (tmp_path / "run" / "checkpoints" / "3" / "items").glob("*.data")
    with open(data, "r+b") as f:  # a byte of the array's last MiB flipped
        f.seek(w.nbytes - 1000)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    dst = tmp_path / "out" / "checkpoints"
    with pytest.raises(ChecksumMismatchError):
        export_orbax(str(tmp_path / "run"), str(dst))
    assert sorted(p.name for p in dst.iterdir()) == []


# -- peak memory, measured in a fresh process ----------------------------------------------------
LARGEST = 128 * MIB
BOUND = LARGEST + 256 * MIB

SAVE = textwrap.dedent(
    """
    import sys
    import numpy as np
    import stepsafe

    rng = np.random.default_rng(0)
    layers = {f"w{i}": rng.random((1024, 8, 1024), np.float32) for i in range(8)}  # 32 MiB
    params = {"decoder": {"layers": layers}}  # stacked, MaxText's scan axis 1
    params["embed"] = rng.random((8192, 4096), np.float32)  # 128 MiB: two 64 MiB chunks
    params["norm"] = np.ones(1024, np.float32)
    stepsafe.save(sys.argv[1], {"params": params, "step": 5})
    """
)

EXPORT = textwrap.dedent(
    """
    import json, sys
    import jax
    import orbax.checkpoint as ocp
    import stepsafe
    from stepsafe.convert.orbax_out import export_orbax

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    jax.process_index()  # JAX's CPU backend up, as in a MaxText process: not counted
    options = json.loads(sys.argv[3])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the current RSS
    before = status("VmRSS")
    if options.pop("hold_whole", False):  # the control: Orbax's own save of the arrays
        tree = stepsafe.restore(sys.argv[1])
        handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)
        ocp.Checkpointer(handler).save(sys.argv[2] + "/5/items", args=ocp.args.PyTreeSave(tree))
    else:
        export_orbax(sys.argv[1], sys.argv[2], **options)
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
    """
)

CASES = {
    "control: stepsafe.restore + Orbax's own save": {"hold_whole": True},
    "export (chunks raw, the export's default)": {},
    "export, zstd (Orbax's default)": {"use_compression": True},
    "export, param-only, unstacked": {"param_only": True, "unstack": True},
}


def python(script: str, *args: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("orbax_mem") / "run" / "checkpoints" / "5"
    python(SAVE, str(src))
    return src


@pytest.mark.parametrize("name", list(CASES))
def test_export_peak_memory_is_bounded_by_the_largest_array(saved, tmp_path, name):
    dst = tmp_path / "out" / "checkpoints"
    got = json.loads(python(EXPORT, str(saved), str(dst), json.dumps(CASES[name])))
    rise = got["peak"] - got["before"]
    print(f"\n{name}: peak rose {rise / MIB:.0f} MiB (bound {BOUND / MIB:.0f} MiB)")
    if name.startswith("control"):  # the measurement sees a writer that holds the arrays
        assert rise > BOUND, f"the control rose {rise / MIB:.0f} MiB only"
        return
    assert rise <= BOUND, f"{name}: peak rose {rise / MIB:.0f} MiB"
    want = stepsafe.restore(str(saved))
    if CASES[name].get("unstack"):
        back = orbax_restore(dst / "0" / "items")["params"]
        layer = want["params"]["decoder"]["layers"]["w5"][:, 3]
        assert back["decoder"]["layers_3"]["w5"].tobytes() == layer.tobytes()
        assert back["embed"].tobytes() == want["params"]["embed"].tobytes()
    else:
        assert_bit_exact(orbax_restore(dst / "5" / "items"), want)


def test_the_cli_stores_chunks_raw_unless_zstd_is_asked_for(tmp_path, capsys):
    """``stepsafe convert --to orbax`` stores chunks raw; ``--zstd`` compresses them as Orbax
    does by default; a conversion that does not write Orbax refuses ``--zstd``."""
    from test_orbax_read import cli

    stepsafe.save(str(tmp_path / "s" / "checkpoints" / "1"), {"w": np.arange(4096.0)})
    for extra, zstd in (([], False), (["--zstd"], True)):
        dst = tmp_path / f"o-{zstd}"
        code, _, err = cli(capsys, "convert", tmp_path / "s", dst, "--to", "orbax", *extra,
                           "--no-progress")  # fmt: skip
        assert code == 0, err
        assert ("zstd" in zarr_codecs(dst / "1" / "items", "w", True)) == zstd
        assert_bit_exact(orbax_restore(dst / "1" / "items"), {"w": np.arange(4096.0)})
    code, _, err = cli(capsys, "convert", tmp_path / "s", tmp_path / "x", "--zstd")
    assert code == 2 and "read by --to orbax only" in err and not (tmp_path / "x").exists()
