"""Llama (1, 2, 3, 3.1, 3.2, Code Llama), exactly as HuggingFace transformers' Llama computes it.

Pre-norm blocks with RMSNorm: h = x + attn(input_layernorm x), then h + mlp(post_attention_
layernorm h). Attention has separate q / k / v / o projections, grouped-query (``num_kv_groups``
key/value heads, each shared by num_heads / num_kv_groups query heads), rotary embedding on the
whole head in the rotate-half form with base ``rope_theta`` and optional frequency scaling
(linear, llama3), and an optional sliding window (Mistral). The MLP is SwiGLU:
down(silu(gate x) * up x). Biases where the config asks (Qwen2: q, k, v). The head is a final
RMSNorm (``norm``) and an untied ``lm_head``, or the embedding table when tied (Llama 3.2 1B/3B).
Mistral and Qwen2 are this model with their own defaults and HF names (mistral.py, qwen2.py).
"""

from __future__ import annotations

import jax
from flax import nnx

from wsjax.models.gptj import Embed  # a token table (``wte``), no positions
from wsjax.models.head import Head  # final norm ``norm`` (RMSNorm), lm_head or tied
from wsjax.models.kv_cache import KVCache, attend, rotary_positions
from wsjax.models.layers import (
    RopeScaling,
    apply_rotary,
    dropout,
    linear,
    rms_norm,
    split_rng,
)
from wsjax.precision import at_least_f32

__all__ = ["Embed", "Block", "Head"]


def rope_scaling(cfg) -> RopeScaling | None:
    """The config's RoPE scaling; None when it changes nothing (linear by a factor of 1)."""
    if cfg.pos_scaling_type == "linear" and cfg.pos_scaling_factor == 1.0:
        return None
    return RopeScaling(cfg.pos_scaling_type, cfg.pos_scaling_factor,
                       **dict(cfg.pos_scaling_extra_args or ()))  # fmt: skip


class Attention(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim  # k, v: G heads of K
        bias = cfg.use_projection_bias_in_attention  # q, k, v (Qwen2); o_proj's is its own
        self.cfg = cfg
        self.q_proj = linear(cfg, d, d, bias, rngs)
        self.k_proj = linear(cfg, d, kv, bias, rngs)
        self.v_proj = linear(cfg, d, kv, bias, rngs)
        self.o_proj = linear(cfg, d, d, cfg.use_ffn_bias_in_attention, rngs, kind="output")

    def __call__(self, h: jax.Array, rng, cache: KVCache | None = None):
        b, t, d = h.shape
        c = self.cfg
        q = self.q_proj(h).reshape(b, t, c.num_heads, c.head_dim)  # (B, T, H, K)
        k = self.k_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim)  # (B, T, G, K)
        v = self.v_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim)  # (B, T, G, K)
        pos, scaling = rotary_positions(cache, t), rope_scaling(c)
        q, k = (
            apply_rotary(a, c.head_dim, c.rope_theta, False, pos, scaling) for a in (q, k)
        )  # rotate-half over the whole head
        window = c.attention_sliding_window_length
        o, cache = attend(q, k, v, rng, c.attention_dropout_rate, cache, window)  # (B, T, H, K)
        return self.o_proj(o.reshape(b, t, d)), cache


class MLP(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        d, f, bias = cfg.hidden_size, cfg.filter_size, cfg.use_ffn_bias
        self.gate_proj = linear(cfg, d, f, bias, rngs)
        self.up_proj = linear(cfg, d, f, bias, rngs)
        self.down_proj = linear(cfg, f, d, bias, rngs, kind="output")

    def __call__(self, h: jax.Array) -> jax.Array:
        gate = self.gate_proj(h)  # (B, T, F)
        # silu in at least fp32, rounded once to the compute dtype (as torch's bf16 kernel)
        act = jax.nn.silu(gate.astype(at_least_f32(gate.dtype))).astype(gate.dtype)
        return self.down_proj(act * self.up_proj(h))  # SwiGLU: (B, T, F) -> (B, T, D)


class Block(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.input_layernorm = rms_norm(cfg, rngs)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = rms_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        self.rate = cfg.residual_dropout_rate

    def __call__(self, x: jax.Array, rng: jax.Array | None = None, cache=None):
        """(B, T, D) -> (B, T, D); with a ``KVCache`` (decoding) -> (y, the updated cache)."""
        r_attn, r_out, r_mlp = split_rng(rng, 3)
        attn, cache = self.self_attn(self.input_layernorm(x), r_attn, cache)  # (B, T, D)
        x = x + dropout(r_out, self.rate, attn)
        y = x + dropout(r_mlp, self.rate, self.mlp(self.post_attention_layernorm(x)))
        return y if cache is None else (y, cache)
