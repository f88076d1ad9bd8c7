"""Token-level language-model loss and accuracy, shared by the reference step and the engine.

The loss of a batch is ``sum of masked token losses / number of masked tokens`` over the whole
global batch; micro-batches therefore contribute ``sum / global_count`` so that accumulation is
exact.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wsjax.config.schema import ModelConfig
from wsjax.precision import at_least_f32


def token_loss_sum(
    logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Sum of cross-entropy over tokens with ``mask`` != 0, and the number of such tokens.

    logits: (B, T, V) any float dtype (upcast to fp32, float64 stays); labels: (B, T) int;
    mask: (B, T) float.
    """
    dtype = at_least_f32(logits.dtype)
    logits = logits.astype(dtype)
    # -log softmax at the label = logsumexp - the label's logit: no (B, T, V) log-probabilities
    # are materialised (a full extra pass over the logits on XLA CPU; benchmarks/README.md,
    # "bf16 speed work"); the gradient is still softmax - onehot
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked  # (B, T)
    mask = mask.astype(dtype)
    return jnp.sum(nll * mask), jnp.sum(mask)


def token_correct_sum(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Number of masked tokens whose argmax prediction equals the label."""
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(hit * mask.astype(jnp.float32))


def loss_normalizer(model_cfg: ModelConfig, loss_mask: np.ndarray | jax.Array) -> Any:
    """The denominator of a global batch's loss (numpy or jax ``loss_mask`` of shape (B, T)).

    Cerebras ``loss_scaling: num_tokens`` (the default): the number of loss tokens;
    ``batch_size``: the number of sequences. Either is divided by ``loss_weight``, so the loss is
    ``sum(token losses) * loss_weight / count`` (Cerebras GPT files pair ``batch_size`` with
    ``loss_weight: 1/max_sequence_length``: the per-token mean of full sequences). Engine and
    reference both call this; the result has the mask's array type.
    """
    count = loss_mask.shape[0] if model_cfg.loss_scaling == "batch_size" else loss_mask.sum()
    return count / model_cfg.loss_weight
