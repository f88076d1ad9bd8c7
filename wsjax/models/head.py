"""The LM head both families share: final layer norm, then the (optionally tied) projection."""

from __future__ import annotations

import jax

from wsjax.models.layers import dense, layer_norm
from wsjax.models.spec import ParamSpec, dense_spec, norm_spec
from wsjax.precision import at_least_f32


def head_spec(cfg) -> dict:
    spec = {"ln_f": norm_spec(cfg.hidden_size)}
    if not cfg.share_embedding_weights:
        spec["lm_head"] = dense_spec(cfg.hidden_size, cfg.vocab_size, cfg.use_bias_in_output)
    elif cfg.use_bias_in_output:  # tied kernel (the embedding) with its own output bias
        spec["lm_head"] = {"bias": ParamSpec((cfg.vocab_size,), "zeros")}
    return spec


def head_apply(cfg, p: dict, x: jax.Array, wte: jax.Array | None) -> jax.Array:
    """(B, T, D) -> fp32 logits (B, T, V). ``wte`` is the embedding when weights are tied."""
    h = layer_norm(p["ln_f"], x, cfg.layer_norm_epsilon)
    head = dict(p.get("lm_head", {}))
    if cfg.share_embedding_weights:
        head["kernel"] = wte.T  # (D, V)
    return dense(head, h).astype(at_least_f32(h.dtype))
