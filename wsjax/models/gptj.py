"""GPT-J, exactly as HuggingFace transformers' GPTJ computes it.

One layer norm feeds attention and MLP in parallel; the block output is their sum plus the
residual. Rotary position embedding on the first ``rotary_dim`` dims of each head (interleaved
form); no q/k/v/out biases by default; MLP with biases; untied LM head with bias.
``use_untied_layer_norm`` (a second norm before the MLP) and ``use_parallel_residual: false``
are honoured as in GPT-NeoX.
"""

from __future__ import annotations

import jax
from flax import nnx

from wsjax.models.head import Head
from wsjax.models.kv_cache import KVCache, attend, rotary_positions
from wsjax.models.layers import (
    PreLNBlock,
    activation,
    apply_rotary,
    dropout,
    embedding,
    linear,
)

__all__ = ["Embed", "Block", "Head"]


class Embed(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = embedding(cfg, cfg.vocab_size, rngs)

    def __call__(self, tokens: jax.Array, rng=None, positions=None) -> jax.Array:
        x = self.wte[...][tokens]  # (B, T, D); positions enter through rotary, not here
        return dropout(rng, self.cfg.embedding_dropout_rate, x)


class Attention(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        d, bias = cfg.hidden_size, cfg.use_projection_bias_in_attention
        self.cfg = cfg
        self.q_proj = linear(cfg, d, d, bias, rngs)
        self.k_proj = linear(cfg, d, d, bias, rngs)
        self.v_proj = linear(cfg, d, d, bias, rngs)
        self.out_proj = linear(cfg, d, d, cfg.use_ffn_bias_in_attention, rngs, kind="output")

    def __call__(self, h: jax.Array, rng, cache: KVCache | None = None):
        b, t, d = h.shape
        c = self.cfg
        q = self.q_proj(h).reshape(b, t, c.num_heads, c.head_dim)  # (B, T, H, K)
        k = self.k_proj(h).reshape(b, t, c.num_heads, c.head_dim)
        v = self.v_proj(h).reshape(b, t, c.num_heads, c.head_dim)
        pos = rotary_positions(cache, t)
        q = apply_rotary(q, c.rotary_dim, c.rope_theta, interleaved=True, positions=pos)
        k = apply_rotary(k, c.rotary_dim, c.rope_theta, interleaved=True, positions=pos)
        o, cache = attend(q, k, v, rng, c.attention_dropout_rate, cache)  # (B, T, H, K)
        return self.out_proj(o.reshape(b, t, d)), cache


class MLP(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        d, f, bias = cfg.hidden_size, cfg.filter_size, cfg.use_ffn_bias
        self.nonlinearity = cfg.nonlinearity
        self.fc_in = linear(cfg, d, f, bias, rngs)
        self.fc_out = linear(cfg, f, d, bias, rngs, kind="output")

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.fc_out(activation(self.nonlinearity, self.fc_in(h)))  # (B, T, F) -> (B, T, D)


class Block(PreLNBlock):
    def __init__(self, cfg, rngs: nnx.Rngs):
        attn, mlp = Attention(cfg, rngs), MLP(cfg, rngs)
        untied, parallel = cfg.use_untied_layer_norm, cfg.use_parallel_residual
        super().__init__(cfg, attn, mlp, rngs, untied_norms=untied, parallel=parallel)
