"""Hugging Face safetensors models in and out through conversion functions: the demo model's
parameters exported (layers unstacked, kernels transposed to [out, in]), read back by the
safetensors library, imported bit for bit, loaded by the trainer with
``source_checkpoint_layout=safetensors``; unmapped and missing weights are clear errors.
Real files written by stepsafe and by the safetensors library."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import stepsafe
from stepsafe.cli.main import main
from stepsafe.config import load_config
from stepsafe.convert.hf import conversion_function, export_safetensors, import_safetensors
from stepsafe.convert.hf_demo import from_hf, to_hf
from stepsafe.errors import ConfigError

safetensors_numpy = pytest.importorskip("safetensors.numpy")
pytest.importorskip("jax")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A real demo checkpoint (the trainer in process, a few steps)."""
    from stepsafe.demo.train import train

    root = tmp_path_factory.mktemp("demo")
    config = load_config(
        "examples/configs/demo.yml",
        [f"base_output_directory={root}", "steps=4", "checkpoint_period=2", "log_period=2"],
    )
    train(config)
    return root, config


def load_dir(directory) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(safetensors_numpy.load_file(str(f)))
    return out


def test_export_is_hugging_face_layout_and_imports_back_bit_for_bit(demo, tmp_path):
    root, config = demo
    params = stepsafe.restore(str(root / "demo"))["params"]
    files = export_safetensors(
        str(root / "demo"), str(tmp_path / "hf"), to_hf, max_shard_bytes=1 << 17
    )
    assert files[-1] == "model.safetensors.index.json" and len(files) > 2
    index = json.loads((tmp_path / "hf" / files[-1]).read_text())
    got = load_dir(tmp_path / "hf")
    assert set(index["weight_map"]) == set(got)
    layers = config.num_decoder_layers
    assert len([n for n in got if n.endswith("qkv_proj.weight")]) == layers
    qkv = params["decoder"]["layers"]["attention"]["qkv"]["kernel"]
    for i in range(layers):  # [out, in] = the kernel of layer i, transposed
        np.testing.assert_array_equal(got[f"model.layers.{i}.self_attn.qkv_proj.weight"], qkv[i].T)
    np.testing.assert_array_equal(
        got["model.embed_tokens.weight"], params["token_embedder"]["embedding"]
    )
    import_safetensors(str(tmp_path / "hf"), str(tmp_path / "back"), from_hf)
    back = stepsafe.restore(str(tmp_path / "back"))
    assert stepsafe.info(str(tmp_path / "back")).step == 0
    _assert_same(back["params"], params)


def _assert_same(a, b, path=""):
    if isinstance(b, dict):
        assert set(a) == set(b), path
        for k in b:
            _assert_same(a[k], b[k], f"{path}/{k}")
        return
    assert np.asarray(a).dtype == np.asarray(b).dtype, path
    np.testing.assert_array_equal(a, b, err_msg=path)


def test_files_the_safetensors_library_wrote_import_and_load_in_the_trainer(demo, tmp_path):
    from stepsafe.demo.train import train

    root, config = demo
    params = stepsafe.restore(str(root / "demo"))["params"]
    eager = {name: np.ascontiguousarray(w) for name, w in to_hf(params).items()}
    (tmp_path / "hf").mkdir()
    safetensors_numpy.save_file(eager, str(tmp_path / "hf" / "model.safetensors"))
    import_safetensors(str(tmp_path / "hf"), str(tmp_path / "back"), from_hf)
    _assert_same(stepsafe.restore(str(tmp_path / "back"))["params"], params)
    loaded = train(
        dataclasses.replace(
            config, run_name="from-hf", steps=1, source_checkpoint_layout="safetensors",
            load_parameters_path=str(tmp_path / "hf"),
            checkpoint_conversion_fn="stepsafe.convert.hf_demo:from_hf",
        )
    )  # fmt: skip
    assert loaded.source == "parameters" and loaded.start_step == 0


def test_unmapped_and_missing_weights_are_named(demo, tmp_path):
    root, _ = demo
    params = stepsafe.restore(str(root / "demo"))["params"]
    eager = {name: np.ascontiguousarray(w) for name, w in to_hf(params).items()}
    (tmp_path / "extra").mkdir()
    safetensors_numpy.save_file(
        {**eager, "lm_head.weight": np.zeros((2, 2), np.float32)},
        str(tmp_path / "extra" / "model.safetensors"),
    )
    with pytest.raises(ConfigError, match=r"not mapped by the conversion function: 'lm_head"):
        import_safetensors(str(tmp_path / "extra"), str(tmp_path / "x"), from_hf)
    (tmp_path / "missing").mkdir()
    eager.pop("model.norm.weight")
    safetensors_numpy.save_file(eager, str(tmp_path / "missing" / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"wants weight 'model\.norm\.weight'"):
        import_safetensors(str(tmp_path / "missing"), str(tmp_path / "y"), from_hf)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_conversion_functions_are_named_by_a_dotted_path(tmp_path, capsys):
    assert conversion_function("stepsafe.convert.hf_demo:from_hf") is from_hf
    assert conversion_function("stepsafe.convert.hf_demo.to_hf") is to_hf
    for bad in ("nope.module:fn", "stepsafe.convert.hf_demo:nothing", "stepsafe.convert:ops"):
        with pytest.raises(ConfigError, match=r"cannot be imported|not callable"):
            conversion_function(bad)
    code = main(["convert", str(tmp_path), str(tmp_path / "out"), "--to", "safetensors"])
    assert code == 2 and "--conversion-fn" in capsys.readouterr().err
