"""GPT-NeoX (and Pythia), exactly as HuggingFace transformers' GPTNeoX computes it.

Two layer norms per block (ln_1 before attention, ln_2 before the MLP), parallel residual
x + attn(ln_1 x) + mlp(ln_2 x) or, with ``use_parallel_residual: false``, sequential. Fused qkv
with biases in HF's per-head layout; rotary on the first ``rotary_dim`` dims of each head in the
rotate-half form with base ``rope_theta``; untied LM head without bias. With
``use_untied_layer_norm: false`` ln_1 feeds both branches (the GPT-J wiring).
"""

from __future__ import annotations

import jax
from flax import nnx

from wsjax.models.gptj import Embed  # a token table, no positions: as GPT-J
from wsjax.models.head import Head
from wsjax.models.kv_cache import KVCache, attend, rotary_positions
from wsjax.models.layers import (
    PreLNBlock,
    activation,
    apply_rotary,
    linear,
)

__all__ = ["Embed", "Block", "Head"]


class Attention(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        if cfg.rotary_dim is None:  # the config resolves rotary_pct into rotary_dim
            raise ValueError("model.rotary_dim (or rotary_pct) is required for model_family neox")
        d = cfg.hidden_size
        self.cfg = cfg
        self.query_key_value = linear(cfg, d, 3 * d, cfg.use_projection_bias_in_attention, rngs)
        self.dense = linear(cfg, d, d, cfg.use_ffn_bias_in_attention, rngs, kind="output")

    def __call__(self, h: jax.Array, rng, cache: KVCache | None = None):
        b, t, d = h.shape
        c = self.cfg
        # HF's fused output is per head [q_h | k_h | v_h] (not [all q | all k | all v] as GPT-2)
        qkv = self.query_key_value(h).reshape(b, t, c.num_heads, 3, c.head_dim)  # (B, T, H, 3, K)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # (B, T, H, K)
        pos = rotary_positions(cache, t)
        q = apply_rotary(q, c.rotary_dim, c.rope_theta, interleaved=False, positions=pos)
        k = apply_rotary(k, c.rotary_dim, c.rope_theta, interleaved=False, positions=pos)
        o, cache = attend(q, k, v, rng, c.attention_dropout_rate, cache)  # (B, T, H, K)
        return self.dense(o.reshape(b, t, d)), cache


class MLP(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        d, f, bias = cfg.hidden_size, cfg.filter_size, cfg.use_ffn_bias
        self.nonlinearity = cfg.nonlinearity
        self.dense_h_to_4h = linear(cfg, d, f, bias, rngs)
        self.dense_4h_to_h = linear(cfg, f, d, bias, rngs, kind="output")

    def __call__(self, h: jax.Array) -> jax.Array:
        up = activation(self.nonlinearity, self.dense_h_to_4h(h))  # (B, T, F)
        return self.dense_4h_to_h(up)  # (B, T, D)


class Block(PreLNBlock):
    def __init__(self, cfg, rngs: nnx.Rngs):
        attn, mlp = Attention(cfg, rngs), MLP(cfg, rngs)
        untied, parallel = cfg.use_untied_layer_norm, cfg.use_parallel_residual
        super().__init__(cfg, attn, mlp, rngs, untied_norms=untied, parallel=parallel)
