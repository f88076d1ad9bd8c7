"""GPT-J, exactly as HuggingFace transformers' GPTJ computes it.

One layer norm feeds attention and MLP in parallel; the block output is their sum plus the
residual. Rotary position embedding on the first ``rotary_dim`` dims of each head (interleaved
form); no q/k/v/out biases by default; MLP with biases; untied LM head with bias.
"""

from __future__ import annotations

import jax

from wsjax.models.layers import (
    activation,
    apply_rotary,
    causal_attention,
    dense,
    dropout,
    layer_norm,
    split_rng,
)
from wsjax.models.spec import ParamSpec, dense_spec, norm_spec


def embed_spec(cfg) -> dict:
    return {"wte": ParamSpec((cfg.vocab_size, cfg.hidden_size), "embedding")}


def block_spec(cfg) -> dict:
    d, f = cfg.hidden_size, cfg.filter_size
    qkv_bias = cfg.use_projection_bias_in_attention
    return {
        "ln_1": norm_spec(d),
        "attn": {
            "q_proj": dense_spec(d, d, qkv_bias),
            "k_proj": dense_spec(d, d, qkv_bias),
            "v_proj": dense_spec(d, d, qkv_bias),
            "out_proj": dense_spec(d, d, cfg.use_ffn_bias_in_attention, init="output"),
        },
        "mlp": {
            "fc_in": dense_spec(d, f, cfg.use_ffn_bias),
            "fc_out": dense_spec(f, d, cfg.use_ffn_bias, init="output"),
        },
    }


def embed_apply(cfg, p: dict, tokens: jax.Array, rng, dtype) -> jax.Array:
    x = p["wte"].astype(dtype)[tokens]  # (B, T, D)
    return dropout(rng, cfg.embedding_dropout_rate, x)


def block_apply(cfg, p: dict, x: jax.Array, rng) -> jax.Array:
    b, t, d = x.shape
    h_, k_ = cfg.num_heads, cfg.head_dim
    r_attn, r_out, r_mlp = split_rng(rng, 3)
    h = layer_norm(p["ln_1"], x, cfg.layer_norm_epsilon)  # (B, T, D)

    a = p["attn"]
    q = dense(a["q_proj"], h).reshape(b, t, h_, k_)  # (B, T, H, K)
    k = dense(a["k_proj"], h).reshape(b, t, h_, k_)
    v = dense(a["v_proj"], h).reshape(b, t, h_, k_)
    q, k = apply_rotary(q, cfg.rotary_dim), apply_rotary(k, cfg.rotary_dim)
    o = causal_attention(q, k, v, r_attn, cfg.attention_dropout_rate).reshape(b, t, d)
    attn_out = dropout(r_out, cfg.residual_dropout_rate, dense(a["out_proj"], o))

    m = p["mlp"]
    ff = dense(m["fc_out"], activation(cfg.nonlinearity, dense(m["fc_in"], h)))  # (B, T, D)
    ff = dropout(r_mlp, cfg.residual_dropout_rate, ff)
    return x + attn_out + ff  # parallel attention + MLP
