"""GPT-2 / GPT-3 (dense attention), as HuggingFace transformers' GPT2 computes it.

Learned positions, sequential pre-LN block (two layer norms), fused qkv projection, tied LM head
by default. GPT-3 is this family at GPT-3 sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wsjax.models.layers import activation, causal_attention, dense, dropout, layer_norm, split_rng
from wsjax.models.spec import ParamSpec, dense_spec, norm_spec


def embed_spec(cfg) -> dict:
    return {
        "wte": ParamSpec((cfg.vocab_size, cfg.hidden_size), "embedding"),
        "wpe": ParamSpec((cfg.max_position_embeddings, cfg.hidden_size), "embedding"),
    }


def block_spec(cfg) -> dict:
    d, f = cfg.hidden_size, cfg.filter_size
    return {
        "ln_1": norm_spec(d),
        "attn": {
            "c_attn": dense_spec(d, 3 * d, cfg.use_projection_bias_in_attention),
            "c_proj": dense_spec(d, d, cfg.use_ffn_bias_in_attention, init="output"),
        },
        "ln_2": norm_spec(d),
        "mlp": {
            "c_fc": dense_spec(d, f, cfg.use_ffn_bias),
            "c_proj": dense_spec(f, d, cfg.use_ffn_bias, init="output"),
        },
    }


def embed_apply(cfg, p: dict, tokens: jax.Array, rng, dtype) -> jax.Array:
    t = tokens.shape[1]
    x = p["wte"].astype(dtype)[tokens] + p["wpe"].astype(dtype)[jnp.arange(t)][None]  # (B, T, D)
    return dropout(rng, cfg.embedding_dropout_rate, x)


def block_apply(cfg, p: dict, x: jax.Array, rng) -> jax.Array:
    b, t, d = x.shape
    h_, k_ = cfg.num_heads, cfg.head_dim
    r_attn, r_out, r_mlp = split_rng(rng, 3)

    a = p["attn"]
    h = layer_norm(p["ln_1"], x, cfg.layer_norm_epsilon)
    q, k, v = jnp.split(dense(a["c_attn"], h), 3, axis=-1)  # 3 x (B, T, D)
    q, k, v = (z.reshape(b, t, h_, k_) for z in (q, k, v))  # (B, T, H, K)
    o = causal_attention(q, k, v, r_attn, cfg.attention_dropout_rate).reshape(b, t, d)
    x = x + dropout(r_out, cfg.residual_dropout_rate, dense(a["c_proj"], o))

    m = p["mlp"]
    h = layer_norm(p["ln_2"], x, cfg.layer_norm_epsilon)
    ff = dense(m["c_proj"], activation(cfg.nonlinearity, dense(m["c_fc"], h)))
    return x + dropout(r_mlp, cfg.residual_dropout_rate, ff)
