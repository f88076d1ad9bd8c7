"""GPT-2 / GPT-3 (dense attention), as HuggingFace transformers' GPT2 computes it.

Learned positions, sequential pre-LN block (two layer norms), fused qkv projection, tied LM head
by default. GPT-3 is this family at GPT-3 sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from wsjax.models.head import Head
from wsjax.models.kv_cache import KVCache, attend
from wsjax.models.layers import (
    PreLNBlock,
    activation,
    dropout,
    embedding,
    linear,
)

__all__ = ["Embed", "Block", "Head"]


class Embed(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = embedding(cfg, cfg.vocab_size, rngs)
        self.wpe = embedding(cfg, cfg.max_position_embeddings, rngs)

    def __call__(self, tokens: jax.Array, rng=None, positions=None) -> jax.Array:
        """``positions`` (B, T): each token's position when decoding; default 0..T-1."""
        t = tokens.shape[1]
        pos = jnp.arange(t)[None] if positions is None else positions  # (1|B, T)
        x = self.wte[...][tokens] + self.wpe[...][pos]  # (B, T, D)
        return dropout(rng, self.cfg.embedding_dropout_rate, x)


class Attention(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.cfg = cfg
        self.c_attn = linear(cfg, d, 3 * d, cfg.use_projection_bias_in_attention, rngs)
        self.c_proj = linear(cfg, d, d, cfg.use_ffn_bias_in_attention, rngs, kind="output")

    def __call__(self, h: jax.Array, rng, cache: KVCache | None = None):
        b, t, d = h.shape
        c = self.cfg
        q, k, v = jnp.split(self.c_attn(h), 3, axis=-1)  # 3 x (B, T, D): [all q | all k | all v]
        q, k, v = (a.reshape(b, t, c.num_heads, c.head_dim) for a in (q, k, v))  # (B, T, H, K)
        o, cache = attend(q, k, v, rng, c.attention_dropout_rate, cache)
        return self.c_proj(o.reshape(b, t, d)), cache


class MLP(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        d, f, bias = cfg.hidden_size, cfg.filter_size, cfg.use_ffn_bias
        self.nonlinearity = cfg.nonlinearity
        self.c_fc = linear(cfg, d, f, bias, rngs)
        self.c_proj = linear(cfg, f, d, bias, rngs, kind="output")

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.c_proj(activation(self.nonlinearity, self.c_fc(h)))  # (B, T, F) -> (B, T, D)


class Block(PreLNBlock):
    def __init__(self, cfg, rngs: nnx.Rngs):
        attn, mlp = Attention(cfg, rngs), MLP(cfg, rngs)
        super().__init__(cfg, attn, mlp, rngs, untied_norms=True, parallel=False)
