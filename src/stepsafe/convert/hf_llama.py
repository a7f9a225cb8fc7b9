"""Llama's weights (and Mistral's, named alike) between Hugging Face and MaxText's tree, both
ways: the conversion functions ``stepsafe.convert.hf_llama:from_hf`` and ``:to_hf``.

    MaxText params (scanned: layers on axis 1)       Hugging Face (torch's Linear: [out, in])
    token_embedder/embedding [V, D]                  model.embed_tokens.weight [V, D]
    decoder/layers/pre_self_attention_layer_norm/    model.layers.{i}.input_layernorm.weight
        scale [D, L]
    decoder/layers/self_attention/query/kernel       model.layers.{i}.self_attn.q_proj.weight
        [D, L, H, K]  (RoPE interleaved, x 1/sqrt(K))    [H*K, D]  (RoPE half-split)
    .../self_attention/key/kernel [D, L, G, K]       ...self_attn.k_proj.weight [G*K, D] (same)
    .../self_attention/value/kernel [D, L, G, K]     ...self_attn.v_proj.weight [G*K, D]
    .../self_attention/out/kernel [H, L, K, D]       ...self_attn.o_proj.weight [D, H*K]
    decoder/layers/post_self_attention_layer_norm/   model.layers.{i}.post_attention_layernorm.
        scale [D, L]                                     weight [D]
    decoder/layers/mlp/wi_0/kernel [D, L, F]         ...mlp.gate_proj.weight [F, D]
    decoder/layers/mlp/wi_1/kernel [D, L, F]         ...mlp.up_proj.weight [F, D]
    decoder/layers/mlp/wo/kernel [F, L, D]           ...mlp.down_proj.weight [D, F]
    decoder/decoder_norm/scale [D]                   model.norm.weight [D]
    decoder/logits_dense/kernel [D, V]               lm_head.weight [V, D]  (absent when the
                                                         embeddings are tied: MaxText's
                                                         logits_via_embedding)

(H query heads, G key/value heads, K head_dim, F the MLP's width, L layers.) Two changes
besides names, transposes and reshapes, as MaxText's own conversion makes them:

- MaxText's attention does not divide by sqrt(K): its query kernels are scaled by 1/sqrt(K)
  on import and by sqrt(K) on export (in float32, rounded once to the weights' dtype: exact
  both ways when K is a power of 4, e.g. 16, 64, 256, for float32 and bfloat16; within one
  rounding otherwise, e.g. 128). float16's exponent range is narrow: a query weight below
  sqrt(K) x its smallest normal (8 x 6.1e-5 for K = 64; common in trained weights) becomes
  subnormal when scaled and loses low bits, as in MaxText's own conversion.
- Rotary embeddings: Hugging Face's q/k weights order each head's features half-split (the
  pairs rotated together are j and j + K/2), MaxText's interleaved (2j and 2j + 1); the
  features are permuted so, which leaves the attention unchanged.

Head counts are not in the weights: ``from_hf`` reads them from the model's ``config.json``
(``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``num_hidden_layers``), which
``stepsafe.convert.hf`` gives it. ``to_hf`` reads them from the tree's shapes and checks them
against the config it is given, completing it (for a config of its own it knows only what the
weights say; the rest, e.g. ``rms_norm_eps`` and RoPE's base, are transformers' defaults: give
the original ``config.json`` to keep them). ``to_hf`` takes scanned (``layers``) and unscanned
(``layers_0`` ..) trees; ``from_hf`` makes a scanned one (``stepsafe convert --unstack`` for
the other). Everything is ``convert.ops``: nothing is computed until it is written, one
weight at a time. Biases (``attention_bias``, ``mlp_bias``) are not mapped: such a model's
import names them as unmapped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepsafe.convert import ops
from stepsafe.errors import ConfigError

SCAN_AXIS = 1  # MaxText's param_scan_axis: the layer axis of scanned weights
_ATTN = ("self_attention",)
_NORMS = {  # MaxText path under a layer -> Hugging Face name in layer i
    ("pre_self_attention_layer_norm", "scale"): "input_layernorm.weight",
    ("post_self_attention_layer_norm", "scale"): "post_attention_layernorm.weight",
}
_MLP = {  # transposed: [out, in] <-> [in, out]
    ("mlp", "wi_0", "kernel"): "mlp.gate_proj.weight",
    ("mlp", "wi_1", "kernel"): "mlp.up_proj.weight",
    ("mlp", "wo", "kernel"): "mlp.down_proj.weight",
}
_HEADS = {  # MaxText path -> (Hugging Face name, heads key in _Dims, rotary)
    (*_ATTN, "query", "kernel"): ("self_attn.q_proj.weight", "heads", True),
    (*_ATTN, "key", "kernel"): ("self_attn.k_proj.weight", "kv_heads", True),
    (*_ATTN, "value", "kernel"): ("self_attn.v_proj.weight", "kv_heads", False),
}
_OUT = ((*_ATTN, "out", "kernel"), "self_attn.o_proj.weight")
EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


@dataclass(frozen=True)
class _Dims:
    """What the weights' names and shapes need from the config."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int


def from_hf(flat: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """{Hugging Face Llama name: weight} -> MaxText's ``params`` tree (scanned, layers on
    axis 1), lazily.

    Args:
        flat: the model's weights by name.
        config: its ``config.json``, for the head counts.

    Raises:
        ConfigError: no config, or one without the head counts, or weights whose shapes
            disagree with it.
        KeyError: a weight the model needs is missing (``stepsafe.convert.hf`` names it).
    """
    dims = _dims_of(config, flat)
    hidden = flat[EMBED].shape[1]
    layer: dict[str, Any] = {}
    for path, name in _NORMS.items():
        ops.put(layer, path, _stacked(flat, name, dims, lambda w: w))
    for path, (name, key, rotary) in _HEADS.items():
        heads = getattr(dims, key)
        shape = (heads * dims.head_dim, hidden)
        rescale = 1 / math.sqrt(dims.head_dim) if path[1] == "query" else None
        ops.put(
            layer, path, _stacked(flat, name, dims, _heads_in(heads, dims, rotary, rescale), shape)
        )
    out_shape = (hidden, dims.heads * dims.head_dim)
    ops.put(layer, _OUT[0], _stacked(flat, _OUT[1], dims, _out_in(dims), out_shape))
    for path, name in _MLP.items():
        ops.put(layer, path, _stacked(flat, name, dims, ops.transpose))
    decoder: dict[str, Any] = {"layers": layer, "decoder_norm": {"scale": flat[NORM]}}
    if _tied(config, flat):
        flat.get(LM_HEAD)  # a saved copy of tied embeddings: unused, as by transformers
    else:
        decoder["logits_dense"] = {"kernel": ops.transpose(flat[LM_HEAD])}
    return {"token_embedder": {"embedding": flat[EMBED]}, "decoder": decoder}


def to_hf(params: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """MaxText's Llama ``params`` tree (scanned on axis 1, or unscanned) -> {Hugging Face
    name: weight}, lazily; ``config`` (when given) checked against the weights' shapes and
    completed with them, for ``config.json``.

    Raises:
        ConfigError: the tree is not a Llama's, or ``config`` disagrees with its shapes.
        KeyError: a weight the tree lacks (its key).
    """
    decoder = params["decoder"]
    layers = _layer_trees(decoder)
    first = layers[0]
    hidden, heads, head_dim = (int(n) for n in ops.at(first, (*_ATTN, "query", "kernel")).shape)
    kv_heads = int(ops.at(first, (*_ATTN, "key", "kernel")).shape[1])
    _check_groups(heads, kv_heads, "the tree's attention kernels have")
    dims = _Dims(len(layers), heads, kv_heads, head_dim)
    tied = "logits_dense" not in decoder
    embedding = params["token_embedder"]["embedding"]
    if config is not None:
        width = int(ops.at(first, ("mlp", "wi_0", "kernel")).shape[-1])
        _complete(config, dims, hidden, width, int(embedding.shape[0]), tied, embedding.dtype)
    _refuse_unmapped(params, len(layers), "layers" in decoder, tied)
    out: dict[str, Any] = {EMBED: embedding, NORM: decoder["decoder_norm"]["scale"]}
    if not tied:
        out[LM_HEAD] = ops.transpose(decoder["logits_dense"]["kernel"])
    for i, layer in enumerate(layers):
        for path, name in _NORMS.items():
            out[f"model.layers.{i}.{name}"] = ops.at(layer, path)
        for path, (name, _, rotary) in _HEADS.items():
            rescale = math.sqrt(head_dim) if path[1] == "query" else None
            w = _heads_out(ops.at(layer, path), rotary, rescale)
            out[f"model.layers.{i}.{name}"] = w
        o = ops.reshape(ops.at(layer, _OUT[0]), (heads * head_dim, hidden))
        out[f"model.layers.{i}.{_OUT[1]}"] = ops.transpose(o)
        for path, name in _MLP.items():
            out[f"model.layers.{i}.{name}"] = ops.transpose(ops.at(layer, path))
    return out


def rotary_interleave(head_dim: int) -> np.ndarray:
    """The permutation of a head's features from Hugging Face's half-split rotary layout to
    MaxText's interleaved one (``np.argsort`` of it goes back)."""
    return np.arange(head_dim).reshape(2, head_dim // 2).T.reshape(-1)


def _dims_of(config: dict[str, Any] | None, flat: dict[str, Any]) -> _Dims:
    if config is None:
        raise ConfigError(
            "the Llama conversion needs the model's config.json (head counts are not in the "
            "weights): put it in the model directory"
        )
    heads, kv_heads, head_dim, layers = config_heads(
        config, config.get("hidden_size") or flat[EMBED].shape[1], "config.json"
    )
    if layers is None:  # count them, as the weights are named
        layers = 0
        while f"model.layers.{layers}.input_layernorm.weight" in flat:
            layers += 1
    if layers < 1:
        raise ConfigError(f"config.json gives {layers} layers: there must be at least one")
    return _Dims(layers, heads, kv_heads, head_dim)


def config_heads(config: dict[str, Any], hidden: Any, who: str) -> tuple[int, int, int, int | None]:
    """(heads, key/value heads, head_dim, layers or None) as a Llama ``config.json`` gives
    them (``head_dim`` defaults to ``hidden`` / heads, key/value heads to the heads; 0 is
    not absent), checked: each at least 1, head_dim even (rotary pairs), the key/value heads
    dividing the heads. ``who`` names the config in errors.

    Raises:
        ConfigError: a count missing, not a number, or not as above.
    """
    try:
        heads = int(config["num_attention_heads"])
        kv_heads = int(_given(config, "num_key_value_heads", heads))
        head_dim = int(_given(config, "head_dim", int(hidden) // heads))
        said = config.get("num_hidden_layers")
        layers = None if said is None else int(said)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(
            f"{who} does not give the attention heads ({e}): num_attention_heads, "
            "num_key_value_heads and head_dim (or hidden_size) are needed"
        ) from e
    if min(heads, kv_heads, head_dim) < 1 or head_dim % 2:
        raise ConfigError(
            f"{who} gives {heads} heads, {kv_heads} key/value heads and head_dim {head_dim}: "
            "each must be >= 1, head_dim even (rotary pairs)"
        )
    _check_groups(heads, kv_heads, f"{who} gives")
    return heads, kv_heads, head_dim, layers


def _given(config: dict[str, Any], key: str, default: Any) -> Any:
    """``config[key]``, or ``default`` where it is absent or null (not where it is 0)."""
    value = config.get(key)
    return default if value is None else value


def _check_groups(heads: int, kv_heads: int, who: str) -> None:
    """Grouped-query attention shares each key/value head among heads / kv_heads query heads:
    a count that does not divide makes a model no attention can run (transformers saves one,
    and fails only in its forward pass)."""
    if heads % kv_heads:
        raise ConfigError(
            f"{who} {heads} heads and {kv_heads} key/value heads: the key/value heads must "
            "divide the heads (each is shared by a group of them)"
        )


def _tied(config: dict[str, Any] | None, flat: dict[str, Any]) -> bool:
    """Whether the output layer is the embeddings' (no ``lm_head``: MaxText's
    logits_via_embedding). A config that says so decides; without a word, the weights."""
    said = (config or {}).get("tie_word_embeddings")
    return bool(said) if said is not None else LM_HEAD not in flat


def _stacked(
    flat: dict[str, Any], name: str, dims: _Dims, fn: Any, shape: tuple[int, ...] | None = None
) -> Any:
    """Layer i's ``name`` through ``fn``, stacked along MaxText's layer axis."""
    parts = []
    for i in range(dims.layers):
        w = flat[f"model.layers.{i}.{name}"]
        if shape is not None and tuple(w.shape) != shape:
            raise ConfigError(
                f"model.layers.{i}.{name} is {tuple(w.shape)}, config.json's heads and head_dim "
                f"say {shape}: is it this model's config?"
            )
        parts.append(fn(w))
    return ops.stack(parts, axis=SCAN_AXIS)


def _heads_in(heads: int, dims: _Dims, rotary: bool, rescale: float | None) -> Any:
    """[heads*K, D] -> [D, heads, K], rotary features interleaved, scaled."""

    def convert(w: Any) -> Any:
        x = ops.reshape(ops.transpose(w), (w.shape[1], heads, dims.head_dim))
        if rotary:
            x = ops.take(x, rotary_interleave(dims.head_dim), axis=-1)
        return x if rescale is None else ops.scale(x, rescale)

    return convert


def _heads_out(x: Any, rotary: bool, rescale: float | None) -> Any:
    """[D, heads, K] -> [heads*K, D]: ``_heads_in`` undone."""
    hidden, heads, head_dim = x.shape
    if rescale is not None:
        x = ops.scale(x, rescale)
    if rotary:
        x = ops.take(x, np.argsort(rotary_interleave(head_dim)), axis=-1)
    return ops.transpose(ops.reshape(x, (hidden, heads * head_dim)))


def _out_in(dims: _Dims) -> Any:
    """[D, H*K] -> [H, K, D]."""

    def convert(w: Any) -> Any:
        return ops.reshape(ops.transpose(w), (dims.heads, dims.head_dim, w.shape[0]))

    return convert


def _layer_trees(decoder: dict[str, Any]) -> list[Any]:
    """Each layer's subtree: the slices of the scanned ``layers``, or ``layers_0`` ..."""
    if "layers" in decoder:
        stacked = decoder["layers"]
        paths = [*_NORMS, *_HEADS, _OUT[0], *_MLP]
        sliced = {path: ops.layers(ops.at(stacked, path), axis=SCAN_AXIS) for path in paths}
        counts = {len(v) for v in sliced.values()}
        if len(counts) != 1:
            raise ConfigError(f"the scanned layers disagree on their count: {sorted(counts)}")
        trees: list[dict[str, Any]] = [{} for _ in range(counts.pop())]
        for path, parts in sliced.items():
            for tree, part in zip(trees, parts):
                ops.put(tree, path, part)
        return trees
    count = 0
    while f"layers_{count}" in decoder:
        count += 1
    if not count:
        raise ConfigError(
            "the tree's decoder has neither 'layers' (scanned) nor 'layers_0' ..: not MaxText's "
            "Llama parameters"
        )
    return [decoder[f"layers_{i}"] for i in range(count)]


def _refuse_unmapped(params: dict[str, Any], count: int, scanned: bool, tied: bool) -> None:
    """A weight of the tree that ``to_hf`` would leave out (a bias, another architecture's
    part) is an error naming it, never dropped."""
    per_layer = [*_NORMS, *_HEADS, _OUT[0], *_MLP]
    keys = ["layers"] if scanned else [f"layers_{i}" for i in range(count)]
    mapped = {("token_embedder", "embedding"), ("decoder", "decoder_norm", "scale")}
    mapped |= {("decoder", key, *path) for key in keys for path in per_layer}
    if not tied:
        mapped.add(("decoder", "logits_dense", "kernel"))
    unmapped = ["/".join(p) for p in _paths(params) if p not in mapped]
    if unmapped:
        few = ", ".join(unmapped[:5]) + (f" and {len(unmapped) - 5} more" * (len(unmapped) > 5))
        raise ConfigError(
            f"{len(unmapped)} weight(s) of the tree have no Hugging Face Llama name: {few}; "
            "is it MaxText's Llama (or Mistral) without biases?"
        )


def _paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _paths(v, (*prefix, str(k)))]
    return [prefix]


def _complete(
    config: dict[str, Any],
    dims: _Dims,
    hidden: int,
    width: int,
    vocab: int,
    tied: bool,
    dtype: Any,
) -> None:
    """``config`` checked against what the weights say, and completed with it."""
    said = {
        "hidden_size": hidden,
        "intermediate_size": width,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "head_dim": dims.head_dim,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }
    wrong = [
        f"{key} {config[key]!r} (the weights: {value!r})"
        for key, value in said.items()
        if config.get(key) is not None and config[key] != value
    ]
    if wrong:
        raise ConfigError(
            f"the Hugging Face config disagrees with the weights: {', '.join(wrong)}; give "
            "this model's config.json"
        )
    for key, value in said.items():
        if config.get(key) is None:
            config[key] = value
    config.setdefault("model_type", "llama")
    config.setdefault("architectures", ["LlamaForCausalLM"])
    if "dtype" not in config and "torch_dtype" not in config:
        name = np.dtype(dtype).name
        if name in ("float32", "bfloat16", "float16"):
            config["dtype"] = name
