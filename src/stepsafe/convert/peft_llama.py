"""Llama's (and Mistral's) LoRA adapters under PEFT's names -> MaxText's adapter tree: the
conversion function ``stepsafe.convert.peft_llama:from_peft`` that ``import_peft`` takes.

    PEFT tensor in layer i (torch [out, in])       MaxText adapter params (layers on axis 1)
    base_model.model.model.layers.{i}.
      self_attn.q_proj.lora_A [r, D]               decoder/layers/self_attention/query/
                                                       lora_a.kernel [D, L, r]
      self_attn.q_proj.lora_B [H*K, r]                 lora_b.kernel [r, L, H, K] (RoPE
                                                       interleaved, x 1/sqrt(K))
      self_attn.k_proj.lora_A / lora_B             .../key/   [D, L, r] / [r, L, G, K] (RoPE)
      self_attn.v_proj.lora_A / lora_B             .../value/ [D, L, r] / [r, L, G, K]
      self_attn.o_proj.lora_A [r, H*K]             .../out/lora_a.kernel [H, L, K, r]
      self_attn.o_proj.lora_B [D, r]               .../out/lora_b.kernel [r, L, D]
      mlp.gate_proj / up_proj / down_proj          decoder/layers/mlp/wi_0 / wi_1 / wo:
                                                       [in, L, r] / [r, L, out]

Each pair is the base kernel's (``hf_llama.from_hf``) with r put in: ``A`` takes the
kernel's input-side reshape, ``B`` the transform of its output features. Both transforms of
``from_hf`` act on output features alone (the query's rotary permutation and 1/sqrt(K) scale,
the key's permutation) and commute with adding ``A·B``: ``(W + A·B)·s = W·s + A·(B·s)``. So
``merge_lora`` of the imported adapter into the imported base gives ``from_hf`` of the model
PEFT merged itself (``merge_and_unload``): bit for bit when s is a power of two (K = 16, 64,
256) and the float32 products round alike, within one rounding otherwise.

Head counts are not in an adapter's weights, and a PEFT adapter directory holds no
``config.json`` of its base: the function takes the base's ``config`` (``hidden_size``,
``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, as ``from_hf`` reads them).
``import_peft`` passes the one it is given (``base_config``; the command line's
``--hf-config BASE_DIR``). Without a config, an adapter of the MLP
alone imports (its shapes need no heads); one of attention projections is refused, saying
so. Only ``lora_A`` / ``lora_B`` of these seven projections are mapped: any other tensor
(an embedding's ``lora_embedding_A``, ``lm_head``, a DoRA magnitude) is refused by name.
"""

from __future__ import annotations

import math
import re
from typing import Any

from stepsafe.convert import ops
from stepsafe.convert.hf_llama import config_heads, rotary_interleave
from stepsafe.errors import ConfigError

PREFIX = "base_model.model.model.layers"
SCAN_AXIS = 1  # MaxText's param_scan_axis, as hf_llama.from_hf stacks the base
_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(0|[1-9][0-9]*)\."
    r"(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])\.weight"
)
# PEFT module (under layer i) -> (MaxText path under decoder/layers, heads key or None, kind)
_MODULES: dict[str, tuple[tuple[str, ...], str | None, str]] = {
    "self_attn.q_proj": (("self_attention", "query"), "heads", "query"),
    "self_attn.k_proj": (("self_attention", "key"), "kv_heads", "key"),
    "self_attn.v_proj": (("self_attention", "value"), "kv_heads", "value"),
    "self_attn.o_proj": (("self_attention", "out"), "heads", "out"),
    "mlp.gate_proj": (("mlp", "wi_0"), None, "dense"),
    "mlp.up_proj": (("mlp", "wi_1"), None, "dense"),
    "mlp.down_proj": (("mlp", "wo"), None, "dense"),
}


def from_peft(flat: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """{PEFT tensor name: weight} of a Llama (or Mistral) adapter -> MaxText's adapter params
    (scanned: layers on axis 1), lazily.

    Args:
        flat: the adapter's tensors by name (``adapter_model.safetensors``).
        config: the base model's ``config.json``, for the head counts; needed when an
            attention projection is adapted (``import_peft``'s ``base_config``).

    Raises:
        ConfigError: a tensor that is no Llama projection's ``lora_A`` / ``lora_B``; a module
            with one of the pair, or missing in some layer; attention adapted and no config
            (or one without the heads); shapes that disagree with the config or each other.
    """
    found = _parse(flat)
    if not found:
        raise ConfigError(
            "no Llama LoRA tensors (base_model.model.model.layers.{i}.self_attn.q_proj."
            "lora_A.weight ..): is it a Llama or Mistral adapter saved by PEFT?"
        )
    count = 1 + max(i for layers in found.values() for i in layers)
    for module, present in found.items():
        missing = [i for i in range(count) if present.get(i) != {"A", "B"}]
        if missing:
            raise ConfigError(
                f"{module} has no lora_A and lora_B in layer(s) {missing[:5]} of {count}: "
                "stepsafe's adapters adapt every layer (PEFT's layers_to_transform is not read)"
            )
    heads = _heads(config, flat, found, count)
    layers: dict[str, Any] = {}
    for module in found:
        path, key, kind = _MODULES[module]
        pair = _pair(flat, module, count, kind, None if key is None else heads[key], heads)
        node = layers
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = pair
    return {"decoder": {"layers": layers}}


# the layer axis from_peft stacks along, which import_peft records for merges
from_peft.scan_axis = SCAN_AXIS  # type: ignore[attr-defined]


def _parse(flat: dict[str, Any]) -> dict[str, dict[int, set[str]]]:
    """{PEFT module: {layer: {"A", "B"}}} of ``flat``'s names, modules in ``_MODULES``'s order.

    Raises:
        ConfigError: names that are not a Llama projection's lora_A / lora_B (listed).
    """
    found: dict[str, dict[int, set[str]]] = {}
    unknown = []
    for name in dict.keys(flat):  # names alone: a weight counts as used when looked up
        match = _NAME.fullmatch(name)
        if match is None:
            unknown.append(name)
            continue
        layer, module, which = match.groups()
        found.setdefault(module, {}).setdefault(int(layer), set()).add(which)
    if unknown:
        few = ", ".join(repr(n) for n in unknown[:5]) + (
            f" and {len(unknown) - 5} more" * (len(unknown) > 5)
        )
        raise ConfigError(
            f"{len(unknown)} tensor(s) are no Llama projection's LoRA weights: {few}; only "
            "q/k/v/o_proj and gate/up/down_proj's lora_A and lora_B are mapped"
        )
    return {m: found[m] for m in _MODULES if m in found}


def _heads(
    config: dict[str, Any] | None,
    flat: dict[str, Any],
    found: dict[str, dict[int, set[str]]],
    count: int,
) -> dict[str, int]:
    """The head counts and head_dim ``from_hf`` uses for the base ({} for an MLP adapter
    without a config), checked against the adapter's shapes."""
    attention = [m for m in found if _MODULES[m][1] is not None]
    if config is None:
        if attention:
            raise ConfigError(
                f"the adapter adapts {', '.join(attention)}, whose head counts are not in its "
                "weights: give the base model's config.json (stepsafe convert --from peft "
                "--hf-config BASE_DIR; import_peft(..., base_config=read_config(BASE_DIR)))"
            )
        return {}
    hidden = config.get("hidden_size") or _hidden(flat, found)
    heads, kv_heads, head_dim, said = config_heads(config, hidden, "the base config")
    layers = count if said is None else said
    if layers != count:
        raise ConfigError(
            f"the adapter has {count} layer(s), the base config {layers}: is it this base's "
            "adapter? (PEFT's layers_to_transform is not read)"
        )
    return {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}


def _hidden(flat: dict[str, Any], found: dict[str, dict[int, set[str]]]) -> int:
    """The model's width as the adapter's shapes say it (layer 0 of its first module): the
    input of every projection but o_proj and down_proj, whose output it is."""
    module = next(iter(found))
    if module in ("self_attn.o_proj", "mlp.down_proj"):
        return int(flat[_tensor(0, module, "B")].shape[0])
    return int(flat[_tensor(0, module, "A")].shape[1])


def _tensor(layer: int, module: str, which: str) -> str:
    return f"{PREFIX}.{layer}.{module}.lora_{which}.weight"


def _pair(
    flat: dict[str, Any],
    module: str,
    count: int,
    kind: str,
    heads: int | None,
    dims: dict[str, int],
) -> dict[str, Any]:
    """``module``'s ``lora_a.kernel`` and ``lora_b.kernel``, each layer converted as
    ``from_hf`` converts the base kernel's input or output side, stacked on axis 1."""
    a_parts, b_parts = [], []
    for i in range(count):
        a, b = flat[_tensor(i, module, "A")], flat[_tensor(i, module, "B")]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise ConfigError(
                f"{_tensor(i, module, 'A')} {tuple(a.shape)} and lora_B {tuple(b.shape)} are "
                "not a LoRA pair ([r, in] and [out, r])"
            )
        if heads is not None:
            side = a.shape[1] if kind == "out" else b.shape[0]
            if side != heads * dims["head_dim"]:
                raise ConfigError(
                    f"{_tensor(i, module, 'A' if kind == 'out' else 'B')} has {side} features, "
                    f"the base config's {heads} heads x head_dim {dims['head_dim']} say "
                    f"{heads * dims['head_dim']}: is it this base's adapter?"
                )
        a_parts.append(_a_side(a, kind, heads, dims))
        b_parts.append(_b_side(b, kind, heads, dims))
    return {
        "lora_a.kernel": ops.stack(a_parts, axis=SCAN_AXIS),
        "lora_b.kernel": ops.stack(b_parts, axis=SCAN_AXIS),
    }


def _a_side(a: Any, kind: str, heads: int | None, dims: dict[str, int]) -> Any:
    """lora_A [r, in] -> [in.., r]: the out projection's input is [heads, head_dim]."""
    x = ops.transpose(a)
    if kind == "out":
        x = ops.reshape(x, (heads, dims["head_dim"], a.shape[0]))
    return x


def _b_side(b: Any, kind: str, heads: int | None, dims: dict[str, int]) -> Any:
    """lora_B [out, r] -> [r, out..]: heads split, rotary features interleaved (query, key),
    scaled by 1/sqrt(head_dim) (query), as ``from_hf`` does the base kernel's output."""
    x = ops.transpose(b)
    if kind in ("query", "key", "value"):
        head_dim = dims["head_dim"]
        x = ops.reshape(x, (b.shape[1], heads, head_dim))
        if kind != "value":
            x = ops.take(x, rotary_interleave(head_dim), axis=-1)
        if kind == "query":
            x = ops.scale(x, 1 / math.sqrt(head_dim))
    return x
