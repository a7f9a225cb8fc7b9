"""The demo model's LoRA adapters under PEFT's names: the conversion function
``import_peft`` takes, and the map of PEFT module names to the demo's modules.

    PEFT tensor in layer i (torch [out, in])    demo adapter params (layers stacked on axis 0)
    base_model.model.model.layers.{i}.self_attn.
        qkv_proj.lora_A.weight [r, D]           decoder/layers/attention/qkv/lora_a.kernel [L,D,r]
        qkv_proj.lora_B.weight [3D, r]          decoder/layers/attention/qkv/lora_b.kernel [L,r,3D]
        o_proj.lora_A.weight [r, D]             decoder/layers/attention/out/lora_a.kernel [L,D,r]
        o_proj.lora_B.weight [D, r]             decoder/layers/attention/out/lora_b.kernel [L,r,D]

The module names follow ``hf_demo`` (the demo's Hugging Face-style names), so an adapter that
PEFT trained on a torch model named that way imports as it is. ``lora_a.kernel = lora_A.T``
and ``lora_b.kernel = lora_B.T`` (kernels are [in, out]).
"""

from __future__ import annotations

from typing import Any

from stepsafe.convert import ops

PREFIX = "base_model.model.model.layers"
SCAN_AXIS = 0  # the demo stacks its layers along axis 0
# PEFT module name -> the demo's module path in its params
TARGETS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("decoder", "layers", "attention", "qkv"),
    "o_proj": ("decoder", "layers", "attention", "out"),
}


def from_peft(flat: dict[str, Any]) -> dict[str, Any]:
    """{PEFT tensor name: weight} -> the demo model's adapter params (layers stacked along
    axis 0); modules with no tensors in layer 0 are not adapted.

    Raises:
        KeyError: a layer lacks a tensor that layer 0 has (its name).
    """
    count = 0
    while any(f"{PREFIX}.{count}.self_attn.{m}.lora_A.weight" in flat for m in TARGETS):
        count += 1
    params: dict[str, Any] = {}
    for module, path in TARGETS.items():
        if flat.get(f"{PREFIX}.0.self_attn.{module}.lora_A.weight") is None:
            continue
        pair = {}
        for ours, theirs in (("lora_a.kernel", "lora_A"), ("lora_b.kernel", "lora_B")):
            parts = [
                ops.transpose(flat[f"{PREFIX}.{i}.self_attn.{module}.{theirs}.weight"])
                for i in range(count)
            ]
            pair[ours] = ops.stack(parts, axis=SCAN_AXIS)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = pair
    return params


# the layer axis from_peft stacks along, which import_peft records for merges
from_peft.scan_axis = SCAN_AXIS  # type: ignore[attr-defined]
