"""A small decoder-only transformer in plain JAX, its layers stacked and run by ``lax.scan``.

Stacked: every per-layer weight has a leading ``num_layers`` axis, which is the
layout MaxText saves by default ("stacked training checkpoint").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from stepsafe.config import Config

Params = dict[str, Any]
SCAN_AXIS = 0  # the layer axis of the stacked weights (MaxText's param_scan_axis is 1)


def init_params(config: Config, key: jax.Array) -> Params:
    d, f, n, v = config.emb_dim, config.mlp_dim, config.num_decoder_layers, config.vocab_size
    k = iter(jax.random.split(key, 8))

    def normal(shape: tuple[int, ...], fan_in: int) -> jax.Array:
        return jax.random.normal(next(k), shape, jnp.float32) / jnp.sqrt(fan_in)

    return {
        "token_embedder": {"embedding": normal((v, d), 1)},
        "pos_embedder": {"embedding": normal((config.max_target_length, d), 1) * 0.1},
        "decoder": {
            "layers": {
                "pre_attention_norm": {"scale": jnp.ones((n, d))},
                "attention": {
                    "qkv": {"kernel": normal((n, d, 3 * d), d)},
                    "out": {"kernel": normal((n, d, d), d)},
                },
                "pre_mlp_norm": {"scale": jnp.ones((n, d))},
                "mlp": {
                    "wi": {"kernel": normal((n, d, f), d), "bias": jnp.zeros((n, f))},
                    "wo": {"kernel": normal((n, f, d), f), "bias": jnp.zeros((n, d))},
                },
            },
            "final_norm": {"scale": jnp.ones((d,))},
        },
    }


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def _layer(config: Config, x: jax.Array, p: Params) -> jax.Array:
    b, t, d = x.shape
    h = config.num_heads
    y = _rms_norm(x, p["pre_attention_norm"]["scale"])
    q, k, v = jnp.split(y @ p["attention"]["qkv"]["kernel"], 3, axis=-1)
    q, k, v = (z.reshape(b, t, h, d // h) for z in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // h)
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    attn = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    x = x + attn @ p["attention"]["out"]["kernel"]
    y = _rms_norm(x, p["pre_mlp_norm"]["scale"])
    mlp = p["mlp"]
    y = jax.nn.gelu(y @ mlp["wi"]["kernel"] + mlp["wi"]["bias"]) @ mlp["wo"]["kernel"]
    return x + y + mlp["wo"]["bias"]


def forward(config: Config, params: Params, tokens: jax.Array) -> jax.Array:
    """Next-token logits for ``tokens`` [batch, length]."""
    emb = params["token_embedder"]["embedding"]
    x = emb[tokens] + params["pos_embedder"]["embedding"][: tokens.shape[1]]
    x, _ = jax.lax.scan(lambda c, p: (_layer(config, c, p), None), x, params["decoder"]["layers"])
    x = _rms_norm(x, params["decoder"]["final_norm"]["scale"])
    return x @ emb.T


def loss_fn(config: Config, params: Params, batch: jax.Array) -> jax.Array:
    logits = forward(config, params, batch[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))
