"""``stepsafe convert`` / ``convert_checkpoint``: MaxText's checkpoint kinds (#15 items 1, 2, 7).

Training -> param-only -> unstacked -> stacked gives back the original params bit for bit
(MaxText's layer axis 1 and the demo model's 0); param-only is step 0 and holds only the
params; a dtype cast touches floating arrays only; a real demo-trainer checkpoint converts and
comes back; the CLI's output and exit codes; conversions to and from a loopback S3 server; and
a conversion killed half-way leaves nothing committed, after which a second one succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import servers
from trees import assert_bit_exact

import stepsafe
from stepsafe import CheckpointExistsError, ConfigError, StepsafeError
from stepsafe.cli.common import ExitCode
from stepsafe.cli.main import main
from stepsafe.convert import convert_checkpoint, stack_layers, unstack_layers
from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.manager import CheckpointManager, ManagerOptions
from stepsafe.storage import storage_for

BF16 = ml_dtypes.bfloat16
LAYERS = 3
STEPSAFE = str(Path(sys.executable).with_name("stepsafe"))


def layer_arrays(rng: np.random.Generator, axis: int) -> dict[str, Any]:
    """A decoder's per-layer weights stacked along ``axis`` (f32, bf16, int, 1-D norms)."""

    def stacked(*shape: int, dtype: Any = np.float32) -> np.ndarray:
        full = list(shape)
        full.insert(axis if axis >= 0 else len(full) + 1 + axis, LAYERS)
        if np.issubdtype(dtype, np.integer):
            return rng.integers(-1000, 1000, full).astype(dtype)
        return rng.standard_normal(full).astype(dtype)

    return {
        "attention": {"query": {"kernel": stacked(8, 4, 2)}, "out": {"kernel": stacked(4, 2, 8)}},
        "mlp": {"wi": {"kernel": stacked(8, 16, dtype=BF16)}, "wo": {"kernel": stacked(16, 8)}},
        "pre_norm": {"scale": stacked(8)},
        "ids": stacked(5, dtype=np.int32),
        "half": stacked(3, 2, dtype=np.float16),
        "activation": "silu",  # a value: the same in every layer
    }


def make_params(axis: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "token_embedder": {"embedding": rng.standard_normal((32, 8)).astype(np.float32)},
        "decoder": {
            "layers": layer_arrays(rng, axis),
            "decoder_norm": {"scale": np.ones(8, BF16)},
        },
        "counts": np.arange(7, dtype=np.int64),
    }


def make_state(axis: int = 1) -> dict[str, Any]:
    """A MaxText-like training state: step, params, Adam's mu/nu mirroring the params (bf16
    and int arrays included), and Python values."""
    return {
        "step": 1200,
        "params": make_params(axis, 0),
        "opt_state": {"mu": make_params(axis, 1), "nu": make_params(axis, 2), "count": 1200},
        "note": "adamw",
        "lr": 3e-4,
        "flags": [True, None, 2],
    }


def saved(tmp_path: Path, axis: int = 1, name: str = "run") -> tuple[Path, dict]:
    """``make_state(axis)`` saved as step 1200 of run ``name``, as a trainer saves it."""
    state = make_state(axis)
    run = tmp_path / name / "checkpoints"
    with CheckpointManager(str(run), ManagerOptions(async_save=False)) as m:
        m.save(1200, state, custom_metadata={"loss": 1.5}, force=True)
    return run / "1200", state


def take(tree: Any, axis: int, i: int) -> Any:
    if isinstance(tree, dict):
        return {k: take(v, axis, i) for k, v in tree.items()}
    return np.take(tree, i, axis=axis) if isinstance(tree, np.ndarray) else tree


def unstacked_params(params: dict, axis: int, layers: int = LAYERS) -> dict:
    """What unstacking ``params["decoder"]["layers"]`` along ``axis`` must give: ``layers_0``
    .. in the place of ``layers``."""
    dec: dict = {}
    for k, v in params["decoder"].items():
        if k == "layers":
            dec.update({f"layers_{i}": take(v, axis, i) for i in range(layers)})
        else:
            dec[k] = v
    return {**params, "decoder": dec}


def env() -> dict[str, str]:
    """The subprocesses' environment (read when they start: the S3 server's endpoint and the
    dummy credentials are set by fixtures)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def cli(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [1, 0, -1], ids=["maxtext-axis1", "demo-axis0", "last-axis"])
def test_training_to_param_only_to_unstacked_to_stacked_is_bit_exact(tmp_path, axis):
    src, state = saved(tmp_path, axis)
    out = tmp_path / "out" / "checkpoints"
    p = convert_checkpoint(str(src), str(out / "p"), param_only=True)
    assert (p.step, p.layer_sets) == (0, 0)
    assert stepsafe.info(out / "p").step == 0
    assert_bit_exact(stepsafe.restore(out / "p"), {"params": state["params"]})

    u = convert_checkpoint(str(out / "p"), str(out / "u"), unstack=True, scan_axis=axis)
    assert (u.step, u.layer_sets) == (0, 1)
    want = {"params": unstacked_params(state["params"], axis)}
    assert_bit_exact(stepsafe.restore(out / "u"), want)

    s = convert_checkpoint(str(out / "u"), str(out / "s"), stack=True, scan_axis=axis)
    assert (s.step, s.layer_sets) == (0, 1)
    back = stepsafe.restore(out / "s")
    assert_bit_exact(back, {"params": state["params"]})
    for got, orig in zip(_arrays(back["params"]), _arrays(state["params"])):
        np.testing.assert_array_equal(got, orig)
        assert got.dtype == orig.dtype
    assert stepsafe.info(out / "p").custom_metadata == {"loss": 1.5}
    assert stepsafe.info(out / "u").custom_metadata == {"loss": 1.5, "scan_layers": False}
    assert stepsafe.info(out / "s").custom_metadata == {"loss": 1.5, "scan_layers": True}


def _arrays(tree: Any) -> list[np.ndarray]:
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in _arrays(v)]
    return [tree] if isinstance(tree, np.ndarray) else []


def test_param_only_is_step_0_and_holds_only_params(tmp_path):
    src, state = saved(tmp_path)
    dst = tmp_path / "inference" / "checkpoints" / "0"
    done = convert_checkpoint(str(src.parent.parent), str(dst), param_only=True)  # a run: latest
    assert done.path == str(dst) and done.step == 0
    assert stepsafe.info(dst).step == 0
    assert list(stepsafe.metadata(dst)) == ["params"]
    assert done.nbytes == sum(a.nbytes for a in _arrays(state["params"]))
    assert_bit_exact(stepsafe.restore(dst), {"params": state["params"]})
    assert_bit_exact(stepsafe.restore(src), state)  # the source is untouched


def test_dtype_bfloat16_casts_floating_arrays_only(tmp_path):
    src, state = saved(tmp_path)
    dst = tmp_path / "bf16" / "0"
    convert_checkpoint(str(src), str(dst), param_only=True, dtype="bfloat16", unstack=True)

    def cast(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: cast(v) for k, v in x.items()}
        if not isinstance(x, np.ndarray):
            return x
        return x.astype(BF16) if x.dtype.kind == "f" or x.dtype == BF16 else x

    want = {"params": unstacked_params(cast(state["params"]), 1)}
    got = stepsafe.restore(dst)
    assert_bit_exact(got, want)
    assert got["params"]["counts"].dtype == np.int64  # ints untouched
    assert got["params"]["decoder"]["layers_2"]["ids"].dtype == np.int32


def test_dtype_float16_and_float32_are_accepted(tmp_path):
    src, _ = saved(tmp_path)
    convert_checkpoint(str(src), str(tmp_path / "f16"), param_only=True, dtype="float16")
    got = stepsafe.restore(tmp_path / "f16")["params"]
    assert got["token_embedder"]["embedding"].dtype == np.float16
    convert_checkpoint(str(tmp_path / "f16"), str(tmp_path / "f32"), dtype="float32")
    assert stepsafe.restore(tmp_path / "f32")["params"]["counts"].dtype == np.int64


def test_dtype_int4_is_refused(tmp_path):
    src, _ = saved(tmp_path)
    with pytest.raises(ConfigError, match="int4"):
        convert_checkpoint(str(src), str(tmp_path / "i4"), param_only=True, dtype="int4")


def test_unknown_or_integer_dtype_is_refused(tmp_path):
    src, _ = saved(tmp_path)
    for bad in ("bfloat17", "<i4"):
        with pytest.raises(ConfigError, match=bad):
            convert_checkpoint(str(src), str(tmp_path / "x"), param_only=True, dtype=bad)
    assert not (tmp_path / "x").exists()


def test_full_state_unstack_covers_opt_state_layers_too(tmp_path):
    src, state = saved(tmp_path)
    dst = tmp_path / "full" / "checkpoints" / "1200"
    done = convert_checkpoint(str(src), str(dst), unstack=True)
    assert (done.step, done.layer_sets) == (1200, 3)  # params, mu, nu
    want = {
        **state,
        "params": unstacked_params(state["params"], 1),
        "opt_state": {
            "mu": unstacked_params(state["opt_state"]["mu"], 1),
            "nu": unstacked_params(state["opt_state"]["nu"], 1),
            "count": 1200,
        },
    }
    assert_bit_exact(stepsafe.restore(dst), want)
    back = tmp_path / "back" / "checkpoints" / "1200"
    assert convert_checkpoint(str(dst), str(back), stack=True).layer_sets == 3
    assert_bit_exact(stepsafe.restore(back), state)


def test_small_data_files_and_progress_count_every_byte(tmp_path):
    """Arrays split across many small data files (a lazy shard spans files) still come back
    exact, and the progress callback sees exactly the bytes written."""
    src, state = saved(tmp_path)
    seen: list[int] = []
    dst = tmp_path / "small" / "0"
    done = convert_checkpoint(
        str(src), str(dst), unstack=True, data_file_size_bytes=256, on_bytes=seen.append
    )
    assert len(list((dst / "items").glob("*.data"))) > 20
    assert sum(seen) == done.nbytes == sum(a.nbytes for a in _arrays(state))
    back = tmp_path / "small-back" / "0"
    convert_checkpoint(str(dst), str(back), stack=True, data_file_size_bytes=256)
    assert_bit_exact(stepsafe.restore(back), state)


def test_a_single_layer_unstacks_and_stacks(tmp_path):
    w = np.arange(2 * 1 * 3, dtype=np.float32).reshape(2, 1, 3)
    stepsafe.save(tmp_path / "a", {"params": {"layers": {"w": w}}})
    convert_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"), unstack=True)
    assert_bit_exact(stepsafe.restore(tmp_path / "b"), {"params": {"layers_0": {"w": w[:, 0]}}})
    convert_checkpoint(str(tmp_path / "b"), str(tmp_path / "c"), stack=True)
    assert_bit_exact(stepsafe.restore(tmp_path / "c"), {"params": {"layers": {"w": w}}})


def test_a_value_named_layers_elsewhere_is_left_alone(tmp_path):
    """A config value under the same key (``{"config": {"layers": 4}}``) is no stacked
    subtree: unstacking converts the params and keeps the value."""
    state = {"params": {"layers": {"w": np.zeros((2, 3), np.float32)}}, "config": {"layers": 4}}
    stepsafe.save(tmp_path / "a", state)
    convert_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"), unstack=True, scan_axis=0)
    got = stepsafe.restore(tmp_path / "b")
    assert got["config"] == {"layers": 4}
    assert list(got["params"]) == ["layers_0", "layers_1"]


def test_stack_refuses_an_axis_the_layers_do_not_have():
    """Stacking 1-D per-layer arrays along axis 2 cannot be undone by unstacking along 2:
    refused like unstack refuses it, not wrapped around to another axis."""
    leaf = OutLeaf((4,), np.dtype(np.float32), lambda: np.zeros(4, np.float32))
    with pytest.raises(ConfigError, match="axis"):
        unstack_layers({"layers": {"w": OutLeaf((2, 4), leaf.dtype, leaf.make)}}, axis=2)
    with pytest.raises(ConfigError, match="axis 2"):
        stack_layers({"layers_0": {"w": leaf}, "layers_1": {"w": leaf}}, axis=2)


def test_sharded_source_and_empty_arrays_unstack_and_stack(tmp_path):
    """Arrays saved from 4 devices, split along the layer axis and another (a layer's region
    spans several saved shards), and an empty one, come back exact."""
    jax = pytest.importorskip("jax")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    x = np.arange(8 * 4 * 6, dtype=np.float32).reshape(8, 4, 6)
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", "model")))
    empty = np.zeros((0, 4, 3), BF16)
    stepsafe.save(tmp_path / "a", {"params": {"layers": {"x": xs, "empty": empty}}})
    convert_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"), unstack=True, scan_axis=1)
    got = stepsafe.restore(tmp_path / "b")["params"]
    assert list(got) == [f"layers_{i}" for i in range(4)]
    for i in range(4):
        assert_bit_exact(got[f"layers_{i}"], {"x": x[:, i], "empty": empty[:, i]})
    convert_checkpoint(str(tmp_path / "b"), str(tmp_path / "c"), stack=True, scan_axis=1)
    assert_bit_exact(
        stepsafe.restore(tmp_path / "c"), {"params": {"layers": {"x": x, "empty": empty}}}
    )


def test_stack_refuses_layers_that_differ(tmp_path):
    w = np.zeros((2, 3), np.float32)
    for n, other in enumerate((np.zeros((2, 3), BF16), np.zeros((2, 4), np.float32), {"v": w})):
        src = tmp_path / f"a{n}"
        stepsafe.save(src, {"params": {"layers_0": {"w": w}, "layers_1": {"w": other}}})
        with pytest.raises(ConfigError, match="layer 1 differs"):
            convert_checkpoint(str(src), str(tmp_path / "b"), stack=True)
        assert not (tmp_path / "b").exists()
    stepsafe.save(tmp_path / "gap", {"layers_0": {"w": w}, "layers_2": {"w": w}})
    with pytest.raises(ConfigError, match="not numbered"):
        convert_checkpoint(str(tmp_path / "gap"), str(tmp_path / "b"), stack=True)


# -- a real demo-trainer checkpoint ----------------------------------------------------------

DEMO = [
    "steps=2", "checkpoint_period=2", "log_period=1", "warmup_steps=1", "emb_dim=16",
    "mlp_dim=32", "max_target_length=8", "per_device_batch_size=2", "num_decoder_layers=3",
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A run of the real demo trainer (a subprocess): step 2 of run ``demo``."""
    base = tmp_path_factory.mktemp("demo")
    cmd = [STEPSAFE, "train", "--no-progress", f"base_output_directory={base}", "run_name=demo"]
    p = subprocess.run([*cmd, *DEMO], capture_output=True, text=True, env=env(), timeout=300)
    assert p.returncode == 0, p.stderr
    return base / "demo" / "checkpoints" / "2"


def test_demo_checkpoint_to_param_only_unstacked_and_back(demo_run, tmp_path, capsys):
    state = stepsafe.restore(demo_run)
    params = state["params"]
    dst = tmp_path / "demo-params" / "checkpoints" / "0"
    code, out, err = cli(
        capsys, "convert", demo_run, dst, "--param-only", "--unstack", "--scan-axis", "0",
        "--no-progress",
    )  # fmt: skip
    assert code == ExitCode.OK, err
    assert "param-only, unstacked (1 layer set(s))" in out
    got = stepsafe.restore(dst)
    assert_bit_exact(got, {"params": unstacked_params(params, 0, 3)})
    assert stepsafe.info(dst).step == 0

    back = tmp_path / "demo-stacked" / "checkpoints" / "0"
    code, _, err = cli(capsys, "convert", dst, back, "--stack", "--scan-axis", "0", "--json")
    assert code == ExitCode.OK, err
    assert_bit_exact(stepsafe.restore(back), {"params": params})

    # The whole training state too: the optimizer's mu and nu hold the layers as well.
    full = tmp_path / "demo-full" / "checkpoints" / "2"
    done = convert_checkpoint(str(demo_run), str(full), unstack=True, scan_axis=0)
    assert (done.step, done.layer_sets) == (2, 3)
    again = tmp_path / "demo-full-back" / "checkpoints" / "2"
    convert_checkpoint(str(full), str(again), stack=True, scan_axis=0)
    assert_bit_exact(stepsafe.restore(again), state)


def test_demo_checkpoint_on_maxtexts_axis_is_refused_clearly(demo_run, tmp_path, capsys):
    """The demo's layers are on axis 0; MaxText's default (1) finds the norms' axis 1 to be
    the embedding, not a layer count shared by all: refused, nothing written."""
    dst = tmp_path / "wrong" / "0"
    code, _, err = cli(capsys, "convert", demo_run, dst, "--param-only", "--unstack")
    assert code == ExitCode.USAGE
    assert "axis 1" in err and "layers" in err
    assert not (tmp_path / "wrong").exists()


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_prints_one_line_and_json(tmp_path, capsys):
    src, state = saved(tmp_path)
    dst = tmp_path / "out" / "0"
    code, out, err = cli(capsys, "convert", src, dst, "--param-only", "--unstack", "--no-progress")
    assert code == ExitCode.OK, err
    nbytes = sum(a.nbytes for a in _arrays(state["params"]))
    assert out.startswith(f"Wrote {dst}: step 0, param-only, unstacked (1 layer set(s)), ")
    assert out.strip().endswith("of arrays") and out.count("\n") == 1

    dst2 = tmp_path / "out" / "1"
    code, out, err = cli(capsys, "convert", src, dst2, "--json", "--dtype", "bfloat16")
    assert code == ExitCode.OK, err
    doc = json.loads(out)
    assert doc["path"] == str(dst2) and doc["step"] == 1200 and doc["layer_sets"] == 0
    cast = sum(a.size * (2 if a.dtype.kind == "f" or a.dtype == BF16 else a.itemsize)
               for a in _arrays(state))  # fmt: skip
    assert doc["nbytes"] == cast and nbytes < cast


@pytest.mark.parametrize(
    "argv,code,says",
    [
        (["--param-only", "--params-key", "weights"], ExitCode.USAGE, "'weights'"),
        (["--stack"], ExitCode.USAGE, "layers_0"),
        (["--unstack", "--layers-key", "blocks"], ExitCode.USAGE, "'blocks'"),
        (["--unstack", "--stack"], ExitCode.USAGE, "not allowed with"),
        (["--dtype", "bfloat17"], ExitCode.USAGE, "bfloat17"),
        (["--scan-axis", "one"], ExitCode.USAGE, "invalid int"),
    ],
    ids=["no-params-key", "nothing-to-stack", "nothing-to-unstack", "both", "dtype", "axis"],
)
def test_cli_refusals_write_nothing(tmp_path, capsys, argv, code, says):
    src, _ = saved(tmp_path)
    dst = tmp_path / "out" / "checkpoints" / "0"
    got, out, err = cli(capsys, "convert", src, dst, *argv)
    assert got == code, err
    assert says in err and out == ""
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_existing_dst_is_refused_and_kept(tmp_path, capsys):
    src, _ = saved(tmp_path)
    dst = tmp_path / "out" / "checkpoints" / "0"
    stepsafe.save(dst, {"mine": np.arange(3)})
    code, _, err = cli(capsys, "convert", src, dst, "--param-only")
    assert code == ExitCode.FAILED  # CheckpointExistsError: "any other stepsafe error"
    assert str(dst) in err and "Traceback" not in err
    assert_bit_exact(stepsafe.restore(dst), {"mine": np.arange(3)})
    with pytest.raises(CheckpointExistsError):
        convert_checkpoint(str(src), str(dst), param_only=True)
    with pytest.raises(CheckpointExistsError):
        convert_checkpoint(str(src), str(src))  # onto itself


def test_cli_missing_source_is_not_found(tmp_path, capsys):
    code, _, err = cli(capsys, "convert", tmp_path / "nothing", tmp_path / "out")
    assert code == ExitCode.NOT_FOUND
    assert str(tmp_path / "nothing") in err
    assert not (tmp_path / "out").exists()


# -- buckets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bucket_url", ["s3"], indirect=True)
def test_to_within_and_from_an_s3_bucket(tmp_path, bucket_url, capsys):
    src, state = saved(tmp_path)
    up = f"{bucket_url}/inference/checkpoints/0"
    done = convert_checkpoint(str(src), up, param_only=True, data_file_size_bytes=1024)
    assert done.path.endswith("inference/checkpoints/0") and done.step == 0
    assert_bit_exact(stepsafe.restore(up), {"params": state["params"]})

    # Bucket to bucket: unstacking reads layer regions from the bucket.
    flat = f"{bucket_url}/unstacked/checkpoints/0"
    assert convert_checkpoint(up, flat, unstack=True).layer_sets == 1
    want = {"params": unstacked_params(state["params"], 1)}
    assert_bit_exact(stepsafe.restore(flat), want)

    down = tmp_path / "down" / "checkpoints" / "0"  # from the bucket, through the CLI
    code, out, err = cli(capsys, "convert", f"{bucket_url}/unstacked", down, "--stack", "--json")
    assert code == ExitCode.OK, err
    assert json.loads(out)["layer_sets"] == 1
    assert_bit_exact(stepsafe.restore(down), {"params": state["params"]})

    code, _, err = cli(capsys, "convert", down, up, "--no-progress")  # taken: refused
    assert code == ExitCode.FAILED and "Traceback" not in err
    assert_bit_exact(stepsafe.restore(up), {"params": state["params"]})


# -- interrupted ----------------------------------------------------------------------------

# Converts with small data files and, half-way through the bytes, says so and waits to be
# killed: a deterministic "mid-way" for SIGKILL.
KILLED = textwrap.dedent(
    """
    import sys, time
    from stepsafe.convert import convert_checkpoint

    total = int(sys.argv[3])
    done = 0

    def on_bytes(n):
        global done
        done += n
        if done >= total // 2:
            print("half", flush=True)
            time.sleep(120)

    convert_checkpoint(sys.argv[1], sys.argv[2], param_only=True, unstack=True,
                       data_file_size_bytes=64 << 10, on_bytes=on_bytes)
    print("finished", flush=True)
    """
)


def big_state() -> dict:
    rng = np.random.default_rng(5)
    layers = {f"w{i}": rng.standard_normal((256, 4, 512)).astype(np.float32) for i in range(4)}
    params = {"decoder": {"layers": layers}, "embed": rng.standard_normal((512, 256), np.float32)}
    return {"step": 9, "params": params, "opt_state": {"mu": params}}


def started_files(base: str, dst: str) -> list[str]:
    """Every file under ``base`` (a directory or bucket prefix): what a killed conversion
    left."""
    storage, _ = storage_for(base)
    if "://" not in base:
        return [str(p) for p in Path(base).rglob("*") if p.is_file()]
    return list(storage.fs.find(base.split("://", 1)[1]))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sigkill_mid_conversion_commits_nothing_then_a_second_succeeds(
    tmp_path, request, capsys, where
):
    state = big_state()
    src = tmp_path / "run" / "checkpoints" / "9"
    stepsafe.save(src, state)
    if where == "s3":
        request.getfixturevalue("s3_server")
        base = f"s3://{servers.BUCKET}/killed-{os.getpid()}-{id(tmp_path):x}"
    else:
        base = str(tmp_path / "base")
    dst = f"{base}/out/checkpoints/0"
    total = sum(a.nbytes for a in _arrays(state["params"]))
    p = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(src), dst, str(total)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip
    try:
        assert p.stdout.readline().strip() == "half", p.stderr.read()
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=30) == -signal.SIGKILL
    finally:
        p.kill()
        p.communicate()

    left = started_files(base, dst)
    assert any(n.endswith(".data") for n in left), left  # it was killed mid-way
    with pytest.raises(StepsafeError):
        stepsafe.restore(dst)
    code, out, _ = cli(capsys, "ls", base, "--json")
    runs = json.loads(out)["runs"] if code == ExitCode.OK else []
    assert all(r["num_complete"] == 0 for r in runs), out

    code, _, err = cli(capsys, "convert", src, dst, "--param-only", "--unstack", "--no-progress")
    assert code == ExitCode.OK, err
    want = {
        "params": {
            **state["params"],
            "decoder": {
                f"layers_{i}": take(state["params"]["decoder"]["layers"], 1, i) for i in range(4)
            },
        }
    }
    assert_bit_exact(stepsafe.restore(dst), want)
    code, out, _ = cli(capsys, "ls", base, "--json")
    (run,) = json.loads(out)["runs"]
    assert run["num_complete"] == 1 and run["latest_step"] == 0
    code, out, err = cli(capsys, "verify", dst)
    assert code == ExitCode.OK, out + err


# Runs ``stepsafe convert`` (its main) and interrupts itself (a real SIGINT, as Ctrl-C sends)
# once the first data file of the conversion's temporary appears.
INTERRUPTED = textwrap.dedent(
    """
    import glob, os, signal, sys, threading, time
    from stepsafe.cli.main import main

    src, dst = sys.argv[1], sys.argv[2]

    def watch():
        while not glob.glob(os.path.dirname(dst) + "/*tmp*/items/*.data"):
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()
    sys.exit(main(["convert", src, dst, "--unstack", "--no-progress"]))
    """
)


def test_sigint_mid_conversion_exits_130_and_leaves_nothing(tmp_path, capsys):
    rng = np.random.default_rng(3)
    layers = {f"w{i}": rng.standard_normal((1024, 4, 1024)).astype(np.float32) for i in range(8)}
    src = tmp_path / "src" / "1"
    stepsafe.save(src, {"params": {"layers": layers}})  # 128 MiB: the watcher is much faster
    dst = tmp_path / "out" / "checkpoints" / "0"
    p = subprocess.run(
        [sys.executable, "-c", INTERRUPTED, str(src), str(dst)],
        capture_output=True, text=True, env=env(), timeout=120,
    )  # fmt: skip
    assert p.returncode == ExitCode.STOPPED_BY_SIGNAL + signal.SIGINT, p.stderr
    assert "interrupted" in p.stderr and "Traceback" not in p.stderr
    assert list(dst.parent.iterdir()) == []  # no step, no temporary
    code, _, err = cli(capsys, "convert", src, dst, "--unstack", "--no-progress")
    assert code == ExitCode.OK, err
    got = stepsafe.restore(dst)["params"]
    assert list(got) == ["layers_0", "layers_1", "layers_2", "layers_3"]
    np.testing.assert_array_equal(got["layers_2"]["w5"], layers["w5"][:, 2])
