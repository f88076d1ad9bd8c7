"""What "computed in fp32" means, in one place (models, loss, optimizer and engine use it).

Layer norm, softmax, the loss, gradient norms and master weights run in at least fp32: fp32
when the activations are bf16 or fp32, float64 when they are float64 (``jax_enable_x64`` with a
float64 model, how the exactness tests compare engine and reference to ~1e-12).
"""

from __future__ import annotations

import jax.numpy as jnp


def at_least_f32(dtype) -> jnp.dtype:
    """fp32 for bf16 / fp32, float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)
