"""The LM head the families share: final norm, then the (optionally tied) projection.

The final norm is a layer norm ``ln_f`` (GPT-J, GPT-2, GPT-NeoX) or, for ``norm_type:
rmsnorm`` (the Llama families), an RMSNorm named ``norm`` as in HF's Llama.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from wsjax.models.layers import layer_norm, linear, rms_norm
from wsjax.precision import at_least_f32, einsum


class OutputBias(nnx.Module):
    """The output bias of a tied head (its kernel is the embedding table)."""

    def __init__(self, vocab_size: int):
        self.bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))


class Head(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.tied = bool(cfg.share_embedding_weights)
        self.rms = cfg.norm_type == "rmsnorm"
        if self.rms:
            self.norm = rms_norm(cfg, rngs)
        else:
            self.ln_f = layer_norm(cfg, rngs)
        d, v, bias = cfg.hidden_size, cfg.vocab_size, cfg.use_bias_in_output
        if not self.tied:
            self.lm_head = linear(cfg, d, v, bias, rngs)
        elif bias:
            self.lm_head = OutputBias(v)

    def __call__(self, x: jax.Array, wte: jax.Array | None = None) -> jax.Array:
        """(B, T, D) -> fp32 logits (B, T, V); ``wte`` (V, D) is the embedding when tied."""
        h = self.norm(x) if self.rms else self.ln_f(x)  # (B, T, D)
        out = at_least_f32(h.dtype)  # fp32 (float64 for a float64 model)
        if self.tied:  # wte (V, D)
            logits = einsum("btd,vd->btv", h, wte.astype(h.dtype), out)  # (B, T, V)
        else:  # kernel (D, V)
            logits = einsum("btd,dv->btv", h, self.lm_head.kernel[...].astype(h.dtype), out)
        bias = getattr(getattr(self, "lm_head", None), "bias", None)
        return logits if bias is None else logits + bias[...].astype(out)
