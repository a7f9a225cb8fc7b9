"""LoRA adapters against what real users and hostile files do: configs that lie or overflow,
MaxText's own (Orbax) adapters and bases, PEFT adapters saved with other options, a trainer
resumed with other LoRA flags or stopped between an adapter's checkpoint and its config, and
merges checked against MaxText's arithmetic, cut short, and written to buckets."""

from __future__ import annotations

import json
import os
import shutil
import signal

import ml_dtypes
import numpy as np
import pytest
from conftest import BUCKET_KINDS
from trees import assert_bit_exact

import stepsafe
from stepsafe.convert import AdapterConfig, load_adapter, merge_lora, save_adapter
from stepsafe.convert.lora import adapter_config
from stepsafe.convert.lora_merge import merged_kernel
from stepsafe.errors import CheckpointExistsError, ConfigError, CorruptCheckpointError

os.environ["HF_HUB_OFFLINE"] = "1"
L, D, R, ALPHA = 3, 8, 4, 12.0
rng = np.random.default_rng()
f32 = np.float32


def normal(*shape: int, dtype=f32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def demo_pair(r: int = R, out: int = 3 * D) -> dict:
    return {"lora_a.kernel": normal(L, D, r), "lora_b.kernel": normal(L, r, out)}


def demo_adapter() -> dict:
    attention = {"qkv": demo_pair(), "out": demo_pair(out=D)}
    return {"decoder": {"layers": {"attention": attention}}}


def demo_base(dtype=f32) -> dict:
    attention = {"qkv": {"kernel": normal(L, D, 3 * D, dtype=dtype)},
                 "out": {"kernel": normal(L, D, D, dtype=dtype)}}  # fmt: skip
    return {"decoder": {"layers": {"attention": attention}}}


CONFIG = AdapterConfig(R, ALPHA, ("qkv_proj", "o_proj"), {"peft_type": "LORA"})


def by_einsum(w: np.ndarray, a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    """Per layer, MaxText's ``W + einsum("br,rnd->bnd", lora_a, lora_b) * alpha / r`` in
    float64 (its ``apply_lora_on_base_params``, lora_a the contracting left operand)."""
    out = w.astype(np.float64)
    for i in range(w.shape[axis]):
        at = (slice(None),) * axis + (i,)
        al, bl = a[at].astype(np.float64), b[at].astype(np.float64)
        out[at] += np.tensordot(al, bl, axes=1) * (ALPHA / R)
    return out


# -- adapter_config.json that lies or overflows ---------------------------------------------


def test_a_huge_integer_lora_alpha_is_a_config_error():
    doc = {"r": 4, "lora_alpha": 10**400, "target_modules": ["q_proj"]}
    with pytest.raises(ConfigError, match="lora_alpha must be finite"):
        adapter_config(doc, "adapter_config.json")


def test_a_config_that_is_a_directory_is_a_config_error(tmp_path):
    save_adapter(str(tmp_path / "a"), demo_adapter(), CONFIG, scan_axis=0)
    (tmp_path / "a" / "adapter_config.json").unlink()
    (tmp_path / "a" / "adapter_config.json").mkdir()
    with pytest.raises(ConfigError, match=r"adapter_config\.json"):
        load_adapter(str(tmp_path / "a"))


@pytest.mark.parametrize("axis", ["x", [1]])
def test_a_recorded_layer_axis_that_is_no_integer_is_a_config_error(tmp_path, axis):
    stepsafe.save(str(tmp_path / "base"), {"params": demo_base()})
    stepsafe.save(str(tmp_path / "ad" / "0"), {"params": demo_adapter()},
                  custom_metadata={"lora": True, "lora_scan_axis": axis})  # fmt: skip
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(CONFIG.to_json()))
    with pytest.raises(ConfigError, match="not an integer: pass scan_axis"):
        merge_lora(str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("leaf", [{"y": np.ones((D, R), f32)}, 3, "a"])
def test_a_lora_weight_that_is_no_array_is_refused(tmp_path, leaf):
    stepsafe.save(str(tmp_path / "base"), {"params": {"x": {"kernel": normal(D, D)}}})
    tree = {"x": {"lora_a.kernel": leaf, "lora_b.kernel": normal(R, D)}}
    stepsafe.save(str(tmp_path / "ad" / "0"), {"params": tree})
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(CONFIG.to_json()))
    with pytest.raises(CorruptCheckpointError, match=r"as lora_a\.kernel, not an array"):
        load_adapter(str(tmp_path / "ad"))
    with pytest.raises(CorruptCheckpointError, match=r"as lora_a\.kernel, not an array"):
        merge_lora(str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "m"))


def test_lora_alpha_flag_nan_or_inf_is_refused():
    from stepsafe.config import load_config

    for value in ("nan", "inf"):
        with pytest.raises(ConfigError, match="must be >= 0 and finite"):
            load_config(None, ["lora_input_adapters_path=ad", f"lora_alpha={value}"])


# -- merge arithmetic and inputs -------------------------------------------------------------


def test_merged_kernel_leaves_its_inputs_as_they_are():
    w, a, b = normal(L, D, D), normal(L, D, R), normal(L, R, D)
    kept = w.copy()
    got = merged_kernel(w, a, b, ALPHA / R, 0)
    assert_bit_exact(w, kept)
    np.testing.assert_allclose(got, by_einsum(kept, a, b, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_merge_on_axis_1_is_maxtexts_einsum_for_query_and_out(tmp_path, dtype):
    """MaxText's scanned kernels (param_scan_axis 1) and its LoRA shapes
    (get_lora_param_shape): query [emb, L, heads, hd] with A [emb, L, r], B [r, L, heads, hd];
    out [heads, L, hd, emb] with A [heads, L, hd, r], B [r, L, emb]."""
    heads, hd = 2, 3
    base = {"query": {"kernel": normal(D, L, heads, hd, dtype=dtype)},
            "out": {"kernel": normal(heads, L, hd, D, dtype=dtype)}}  # fmt: skip
    adapter = {
        "query": {"lora_a.kernel": normal(D, L, R), "lora_b.kernel": normal(R, L, heads, hd)},
        "out": {"lora_a.kernel": normal(heads, L, hd, R), "lora_b.kernel": normal(R, L, D)},
    }
    stepsafe.save(str(tmp_path / "base"), {"params": base})
    save_adapter(str(tmp_path / "ad"), adapter, CONFIG)  # no axis recorded: MaxText's 1
    merge_lora(str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "m"))
    got = stepsafe.restore(str(tmp_path / "m"))["params"]
    for name in ("query", "out"):
        have = got[name]["kernel"]
        assert have.dtype == np.dtype(dtype) and have.shape == base[name]["kernel"].shape
        pair = adapter[name]
        want = by_einsum(base[name]["kernel"], pair["lora_a.kernel"], pair["lora_b.kernel"], 1)
        assert have.tobytes() != base[name]["kernel"].tobytes()
        tol = {np.float32: 1e-5, np.float16: 2e-3, ml_dtypes.bfloat16: 1.6e-2}[dtype]
        scale = np.abs(want).max()
        np.testing.assert_allclose(have.astype(np.float64), want, rtol=tol, atol=tol * scale)


def test_an_adapter_of_other_layer_count_is_refused(tmp_path):
    stepsafe.save(str(tmp_path / "base"), {"params": demo_base()})
    pair = {"lora_a.kernel": normal(L - 1, D, R), "lora_b.kernel": normal(L - 1, R, 3 * D)}
    save_adapter(str(tmp_path / "ad"), {"decoder": {"layers": {"attention": {"qkv": pair}}}},
                 CONFIG, scan_axis=0)  # fmt: skip
    with pytest.raises(ConfigError, match="do not fit a kernel"):
        merge_lora(str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "m"))


def test_merge_into_an_integer_base_is_refused(tmp_path):
    stepsafe.save(str(tmp_path / "base"), {"params": demo_base(np.int8)})
    save_adapter(str(tmp_path / "ad"), demo_adapter(), CONFIG, scan_axis=0)
    with pytest.raises(ConfigError, match="is int8, not floating"):
        merge_lora(str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_merge_reads_maxtexts_orbax_adapter_and_orbax_base(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    from test_orbax_read import write_manager

    base, adapter = demo_base(), demo_adapter()
    write_manager(tmp_path / "maxtext" / "checkpoints", 5, {"params": base})
    write_manager(tmp_path / "adapters" / "mx", 0, {"params": adapter})  # <lora_id>/0/items
    (tmp_path / "adapters" / "mx" / "adapter_config.json").write_text(json.dumps(CONFIG.to_json()))
    step_dir, adapter_dir = tmp_path / "maxtext" / "checkpoints" / "5", tmp_path / "adapters" / "mx"
    done = merge_lora(str(step_dir), str(adapter_dir), str(tmp_path / "m"), scan_axis=0)
    assert done.step == 5
    got = stepsafe.restore(str(tmp_path / "m"))["params"]["decoder"]["layers"]["attention"]
    for name in ("qkv", "out"):
        w = base["decoder"]["layers"]["attention"][name]["kernel"]
        pair = adapter["decoder"]["layers"]["attention"][name]
        want = by_einsum(w, pair["lora_a.kernel"], pair["lora_b.kernel"], 0)
        np.testing.assert_allclose(got[name]["kernel"], want, rtol=1e-5, atol=1e-5)


def test_a_merge_cut_short_leaves_nothing_and_runs_again(tmp_path):
    stepsafe.save(str(tmp_path / "base"), {"params": demo_base()})
    save_adapter(str(tmp_path / "ad"), demo_adapter(), CONFIG, scan_axis=0)
    written = [0]

    def cut(n: int) -> None:
        written[0] += n
        if written[0] > 256:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_lora(str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "m"),
                   on_bytes=cut, data_file_size_bytes=4096)  # fmt: skip
    assert not (tmp_path / "m").exists()
    merge_lora(str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "m"))
    assert stepsafe.info(str(tmp_path / "m")).custom_metadata["lora_merged"]


@pytest.mark.parametrize("bucket_url", BUCKET_KINDS, indirect=True)
def test_adapter_base_and_merge_in_a_bucket(bucket_url):
    base, adapter = demo_base(), demo_adapter()
    stepsafe.save(f"{bucket_url}/run/checkpoints/7", {"step": 7, "params": base})
    save_adapter(f"{bucket_url}/adapters/a", adapter, CONFIG, scan_axis=0)
    assert_bit_exact(load_adapter(f"{bucket_url}/adapters/a")[1], adapter)
    merge_lora(f"{bucket_url}/run", f"{bucket_url}/adapters/a", f"{bucket_url}/merged")
    got = stepsafe.restore(f"{bucket_url}/merged")["params"]["decoder"]["layers"]["attention"]
    w = base["decoder"]["layers"]["attention"]["out"]["kernel"]
    pair = adapter["decoder"]["layers"]["attention"]["out"]
    want = by_einsum(w, pair["lora_a.kernel"], pair["lora_b.kernel"], 0)
    np.testing.assert_allclose(got["out"]["kernel"], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointExistsError):
        merge_lora(f"{bucket_url}/run", f"{bucket_url}/adapters/a", f"{bucket_url}/merged")
    with pytest.raises(CheckpointExistsError):
        save_adapter(f"{bucket_url}/adapters/a", demo_adapter(), CONFIG)
    assert_bit_exact(load_adapter(f"{bucket_url}/adapters/a")[1], adapter)


# -- an adapter save stopped before its config ----------------------------------------------


def test_an_adapter_save_cut_before_its_config_is_finished_by_the_next(tmp_path):
    adapter = demo_adapter()
    save_adapter(str(tmp_path / "a"), adapter, CONFIG, scan_axis=0)
    (tmp_path / "a" / "adapter_config.json").unlink()  # stopped before the config
    save_adapter(str(tmp_path / "a"), adapter, CONFIG, scan_axis=0)
    assert_bit_exact(load_adapter(str(tmp_path / "a"))[1], adapter)
    # other weights there are never replaced
    (tmp_path / "a" / "adapter_config.json").unlink()
    with pytest.raises(CheckpointExistsError, match="holds other weights"):
        save_adapter(str(tmp_path / "a"), demo_adapter(), CONFIG, scan_axis=0)
    assert not (tmp_path / "a" / "adapter_config.json").exists()
    assert_bit_exact(stepsafe.restore(str(tmp_path / "a" / "0"))["params"], adapter)


# -- PEFT adapters saved with other options --------------------------------------------------


def test_peft_layers_to_transform_is_refused(tmp_path):
    pytest.importorskip("peft")
    from test_peft import write_peft

    from stepsafe.convert import import_peft
    from stepsafe.convert.peft_demo import from_peft

    write_peft(tmp_path / "peft", layers_to_transform=[0])  # layer 1 not adapted
    with pytest.raises(ConfigError, match="layers_to_transform=\\[0\\] is not supported"):
        import_peft(str(tmp_path / "peft"), str(tmp_path / "a"), from_peft)
    assert not (tmp_path / "a").exists()


def test_peft_regex_target_modules_import_as_the_modules_adapted(tmp_path):
    peft = pytest.importorskip("peft")
    from test_peft import DemoTorch

    from stepsafe.convert import import_peft
    from stepsafe.convert.peft_demo import from_peft

    config = peft.LoraConfig(r=R, lora_alpha=8, target_modules=r".*\.(qkv_proj|o_proj)")
    peft.get_peft_model(DemoTorch(D, 2), config).save_pretrained(str(tmp_path / "peft"))
    assert isinstance(json.loads((tmp_path / "peft" / "adapter_config.json").read_text())[
        "target_modules"], str)  # fmt: skip
    done = import_peft(str(tmp_path / "peft"), str(tmp_path / "ad" / "a"), from_peft)
    assert done.target_modules == ("o_proj", "qkv_proj")
    config_read, params = load_adapter(str(tmp_path / "ad" / "a"))
    assert config_read.target_modules == ("o_proj", "qkv_proj")
    assert params["decoder"]["layers"]["attention"]["qkv"]["lora_a.kernel"].shape == (2, D, R)


def test_peft_adapters_of_one_directory_import_one_by_one(tmp_path):
    peft = pytest.importorskip("peft")
    from test_peft import DemoTorch

    from stepsafe.convert import import_peft
    from stepsafe.convert.peft_demo import from_peft

    model = peft.get_peft_model(
        DemoTorch(D, 2), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj"])
    )
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]))
    model.save_pretrained(str(tmp_path / "peft"))
    first = import_peft(str(tmp_path / "peft"), str(tmp_path / "ad" / "first"), from_peft)
    second = import_peft(str(tmp_path / "peft" / "second"), str(tmp_path / "ad" / "second"),
                         from_peft)  # fmt: skip
    assert (first.r, first.target_modules) == (4, ("qkv_proj",))
    assert (second.r, second.target_modules) == (2, ("o_proj",))
    attention = load_adapter(str(tmp_path / "ad" / "second"))[1]["decoder"]["layers"]["attention"]
    assert list(attention) == ["out"] and attention["out"]["lora_b.kernel"].shape == (2, 2, D)


# -- the trainer -----------------------------------------------------------------------------

FLAGS = [
    "steps=3", "checkpoint_period=3", "log_period=1", "warmup_steps=1", "emb_dim=32",
    "mlp_dim=64", "max_target_length=16", "per_device_batch_size=2", "num_decoder_layers=2",
    "async_checkpointing=false",
]  # fmt: skip


def train_config(tmp_path, run: str, *extra: str):
    from stepsafe.config import load_config

    return load_config(None, [*FLAGS, f"base_output_directory={tmp_path}", f"run_name={run}",
                              *extra])  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run (a new adapter, r=2, alpha 2) stopped at step 3, and a run without one."""
    pytest.importorskip("jax")
    from stepsafe.demo.train import train

    root = tmp_path_factory.mktemp("runs")
    (root / "ad").mkdir()
    train(train_config(root, "lora", f"lora_input_adapters_path={root / 'ad'}", "lora_rank=2"))
    train(train_config(root, "plain"))
    return root


@pytest.mark.parametrize(
    "run, extra, message",
    [
        ("lora", ("lora_rank=2", "lora_alpha=16"), "not lora_id=default lora_rank=2 lora_alpha=16"),
        ("lora", ("lora_rank=2", "lora_id=other"), "not lora_id=other"),
        ("lora", ("lora_rank=4",), "lora_rank=2 lora_alpha=2.0"),
        ("lora", None, "resume it with lora_input_adapters_path"),
        ("plain", ("lora_rank=2",), "saved by a run without a LoRA adapter"),
    ],
)
def test_a_resume_with_other_lora_flags_is_refused(tmp_path, lora_run, run, extra, message):
    from stepsafe.demo.train import train

    shutil.copytree(lora_run / run, tmp_path / run)
    (tmp_path / "ad").mkdir()
    flags = [] if extra is None else [f"lora_input_adapters_path={tmp_path / 'ad'}", *extra]
    before = sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=message):
        train(train_config(tmp_path, run, "steps=4", *flags))
    assert sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir()) == before
    # the same flags resume; the manager of the refused start let go of the run
    same = [f"lora_input_adapters_path={tmp_path / 'ad'}", "lora_rank=2"] * (run == "lora")
    assert train(train_config(tmp_path, run, "steps=4", *same)).source == "resume"


def test_a_trainer_stopped_before_the_adapters_config_finishes_it(tmp_path, lora_run):
    from stepsafe.demo.train import train

    shutil.copytree(lora_run / "lora", tmp_path / "lora")
    saved = tmp_path / "lora" / "lora" / "3" / "default"
    (saved / "adapter_config.json").unlink()  # killed between 0/ and the config
    (tmp_path / "ad").mkdir()
    flags = (f"lora_input_adapters_path={tmp_path / 'ad'}", "lora_rank=2")
    result = train(train_config(tmp_path, "lora", *flags))
    assert result.source == "resume" and result.end_step == 3
    import jax

    assert_bit_exact(
        load_adapter(str(saved))[1], jax.tree.map(np.asarray, result.state["lora_params"])
    )


def test_merging_a_trained_adapter_gives_the_kernels_the_trainer_used(tmp_path, lora_run):
    """The adapter the trainer saved (its layer axis 0 recorded), merged into the run's base
    by ``merge_lora``, equals the merged kernels of the trainer's forward pass."""
    import jax

    from stepsafe.demo.lora import merged

    run = lora_run / "lora"
    config, lora = load_adapter(str(run / "lora" / "3" / "default"))
    state = stepsafe.restore(str(run / "checkpoints" / "3"))
    merge_lora(str(run / "checkpoints" / "3"), str(run / "lora" / "3" / "default"),
               str(tmp_path / "m"), param_only=True)  # fmt: skip
    got = stepsafe.restore(str(tmp_path / "m"))["params"]
    want = jax.tree.map(np.asarray, merged(state["params"], lora, config.scale))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    attention = got["decoder"]["layers"]["attention"]
    assert not np.array_equal(
        attention["qkv"]["kernel"],
        state["params"]["decoder"]["layers"]["attention"]["qkv"]["kernel"],
    )


def test_sigint_saves_the_adapter_of_the_step_it_stopped_at(tmp_path, monkeypatch):
    import jax

    from stepsafe.demo.data import SyntheticData
    from stepsafe.demo.train import train

    batches = [0]
    real_next = SyntheticData.__next__

    def next_then_interrupt(self):
        batches[0] += 1
        if batches[0] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_next(self)

    monkeypatch.setattr(SyntheticData, "__next__", next_then_interrupt)
    (tmp_path / "ad").mkdir()
    flags = (f"lora_input_adapters_path={tmp_path / 'ad'}", "lora_rank=2")
    result = train(train_config(tmp_path, "r", "steps=20", *flags))
    assert result.stopped_by == "SIGINT" and result.end_step < 20
    saved = tmp_path / "r" / "lora" / str(result.end_step) / "default"
    assert_bit_exact(load_adapter(str(saved))[1],
                     jax.tree.map(np.asarray, result.state["lora_params"]))  # fmt: skip


def test_a_fresh_run_never_drops_its_adapter_beside_an_earlier_one(tmp_path):
    """Checkpointing off: the adapter is the run's only output. A second run of the same name
    would end at the same <run>/lora/<step>/<lora_id>: refused before it trains, the first
    run's adapter untouched; and an adapter of other weights found at the end is kept and
    said, not passed over as if it were the one trained."""
    import jax

    from stepsafe.demo.lora import plan_lora, save_trained
    from stepsafe.demo.train import train

    (tmp_path / "ad").mkdir()
    flags = (f"lora_input_adapters_path={tmp_path / 'ad'}", "lora_rank=2",
             "enable_checkpointing=false")  # fmt: skip
    first = train(train_config(tmp_path, "r", *flags))
    saved = tmp_path / "r" / "lora" / "3" / "default"
    before = load_adapter(str(saved))[1]
    assert_bit_exact(before, jax.tree.map(np.asarray, first.state["lora_params"]))
    again = (
        f"lora_input_adapters_path={tmp_path / 'r' / 'lora' / '3'}",
        "enable_checkpointing=false",
    )
    with pytest.raises(ConfigError, match="holds the adapter 'default' of an earlier run"):
        train(train_config(tmp_path, "r", *again))
    config = train_config(tmp_path, "r", *flags)
    other = jax.tree.map(lambda x: np.asarray(x) + 1, first.state["lora_params"])
    with pytest.raises(CheckpointExistsError, match="holds another adapter, left as is"):
        save_trained(config, plan_lora(config), other, 3)
    assert_bit_exact(load_adapter(str(saved))[1], before)
    assert save_trained(config, plan_lora(config), before, 3) is None  # the same: once


@pytest.mark.parametrize("targets", [("qkv_proj",), ("qkv_proj", "o_proj")])
def test_target_modules_that_lie_about_the_weights_are_refused_before_training(tmp_path, targets):
    from stepsafe.demo.lora import plan_lora

    both = {
        "qkv": {"lora_a.kernel": normal(2, 32, 2), "lora_b.kernel": normal(2, 2, 96)},
        "out": {"lora_a.kernel": normal(2, 32, 2), "lora_b.kernel": normal(2, 2, 32)},
    }
    if len(targets) == 2:
        del both["out"]
    tree = {"decoder": {"layers": {"attention": both}}}
    save_adapter(str(tmp_path / "ad" / "a"), tree, AdapterConfig(2, 2.0, targets), scan_axis=0)
    config = train_config(tmp_path, "r", f"lora_input_adapters_path={tmp_path / 'ad'}")
    with pytest.raises(ConfigError, match="but its weights adapt"):
        plan_lora(config)


def test_a_start_that_fails_releases_the_run_for_the_next_try(tmp_path):
    """A start that fails after the manager took the run's lease (here: a resume onto a model
    of another width) releases it, so that the next try in the same process may run (it got
    RunInUseError before)."""
    pytest.importorskip("jax")
    from stepsafe.demo.train import train
    from stepsafe.errors import TargetMismatchError

    assert train(train_config(tmp_path, "r")).end_step == 3
    wider = [f for f in FLAGS if not f.startswith(("steps=", "emb_dim="))]
    from stepsafe.config import load_config

    def config(*extra: str):
        return load_config(None, [*wider, f"base_output_directory={tmp_path}", "run_name=r",
                                  "steps=6", *extra])  # fmt: skip

    with pytest.raises(TargetMismatchError):
        train(config("emb_dim=16"))
    assert train(config("emb_dim=32")).end_step == 6
