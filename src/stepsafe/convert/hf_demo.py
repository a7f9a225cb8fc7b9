"""The demo model's weights under Hugging Face-style names, both ways: an example of the
conversion functions ``stepsafe convert`` and ``checkpoint_conversion_fn`` take.

    demo params (stacked along axis 0)            Hugging Face-style name ([out, in] weights)
    token_embedder/embedding [V, D]               model.embed_tokens.weight [V, D]
    pos_embedder/embedding [T, D]                 model.embed_positions.weight [T, D]
    decoder/layers/pre_attention_norm/scale       model.layers.{i}.input_layernorm.weight
    decoder/layers/attention/qkv/kernel [L,D,3D]  model.layers.{i}.self_attn.qkv_proj.weight [3D, D]
    decoder/layers/attention/out/kernel [L,D,D]   model.layers.{i}.self_attn.o_proj.weight [D, D]
    decoder/layers/pre_mlp_norm/scale             model.layers.{i}.post_attention_layernorm.weight
    decoder/layers/mlp/wi/kernel [L,D,F], bias    model.layers.{i}.mlp.up_proj.weight [F,D], .bias
    decoder/layers/mlp/wo/kernel [L,F,D], bias    model.layers.{i}.mlp.down_proj.weight [D,F], .bias
    decoder/final_norm/scale                      model.norm.weight

Kernels are [in, out] (JAX), Hugging Face weights [out, in] (torch's Linear): transposed. The
functions use ``convert.ops``, so nothing is computed until it is written.
"""

from __future__ import annotations

from typing import Any

from stepsafe.convert import ops

_LAYER = {  # demo path under decoder/layers -> (Hugging Face name in layer i, transposed)
    ("pre_attention_norm", "scale"): ("input_layernorm.weight", False),
    ("attention", "qkv", "kernel"): ("self_attn.qkv_proj.weight", True),
    ("attention", "out", "kernel"): ("self_attn.o_proj.weight", True),
    ("pre_mlp_norm", "scale"): ("post_attention_layernorm.weight", False),
    ("mlp", "wi", "kernel"): ("mlp.up_proj.weight", True),
    ("mlp", "wi", "bias"): ("mlp.up_proj.bias", False),
    ("mlp", "wo", "kernel"): ("mlp.down_proj.weight", True),
    ("mlp", "wo", "bias"): ("mlp.down_proj.bias", False),
}
_TOP = {
    ("token_embedder", "embedding"): "model.embed_tokens.weight",
    ("pos_embedder", "embedding"): "model.embed_positions.weight",
    ("decoder", "final_norm", "scale"): "model.norm.weight",
}


def to_hf(params: dict[str, Any]) -> dict[str, Any]:
    """The demo model's ``params`` tree -> {Hugging Face-style name: weight}."""
    out = {name: ops.at(params, path) for path, name in _TOP.items()}
    stacked = params["decoder"]["layers"]
    for path, (name, transposed) in _LAYER.items():
        for i, w in enumerate(ops.layers(ops.at(stacked, path), axis=0)):
            out[f"model.layers.{i}.{name}"] = ops.transpose(w) if transposed else w
    return out


def from_hf(flat: dict[str, Any]) -> dict[str, Any]:
    """{Hugging Face-style name: weight} -> the demo model's ``params`` tree (layers stacked
    along axis 0).

    Raises:
        KeyError: a weight the model needs is missing (its name).
    """
    count = 0
    while f"model.layers.{count}.input_layernorm.weight" in flat:
        count += 1
    params: dict[str, Any] = {}
    for path, name in _TOP.items():
        ops.put(params, path, flat[name])
    for path, (name, transposed) in _LAYER.items():
        parts = [flat[f"model.layers.{i}.{name}"] for i in range(count)]
        parts = [ops.transpose(p) for p in parts] if transposed else parts
        ops.put(params, ("decoder", "layers", *path), ops.stack(parts, axis=0))
    return params
