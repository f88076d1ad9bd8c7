"""The decode path the families share: one layer's KV cache and attention over it.

Generation keeps, per layer, the keys and values of every token seen so far in a fixed-length
cache (B, S, H, K). Prompts of a batch are left-padded to one length, so every row writes its
new token into the same slot; ``start`` marks each row's first real slot. A row's positions
(rotary angles, GPT-2's learned positions) count from its first real token, as HuggingFace
derives them from the attention mask, and no query attends to a pad slot.

Training never builds a cache: ``attend(..., cache=None)`` is exactly ``causal_attention``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from wsjax.models.layers import causal_attention, masked_attention


class KVCache(NamedTuple):
    """One layer's cache and where this call's T tokens go (a pytree: passes through jit)."""

    k: jax.Array  # (B, S, G, K) keys after rotary, in the compute dtype (G = H but under GQA)
    v: jax.Array  # (B, S, G, K)
    index: jax.Array  # () int32: the slot of the first of this call's tokens
    start: jax.Array  # (B,) int32: each row's first real (not left-pad) slot

    def positions(self, t: int) -> jax.Array:
        """(B, T) position of each new token in its own row (pads clamp to 0; never attended)."""
        slots = self.index + jnp.arange(t, dtype=jnp.int32)  # (T,)
        return jnp.maximum(slots[None, :] - self.start[:, None], 0)

    def attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, window: int | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Write k, v (B, T, G, K) at ``index``; attend q (B, T, H, K) over the cache's real,
        earlier slots (the last ``window`` of them with a sliding window: slots and positions
        differ by one offset per row, so slot distance is token distance)."""
        t, s = q.shape[1], self.k.shape[1]
        k_all = jax.lax.dynamic_update_slice_in_dim(self.k, k.astype(self.k.dtype), self.index, 1)
        v_all = jax.lax.dynamic_update_slice_in_dim(self.v, v.astype(self.v.dtype), self.index, 1)
        slots = jnp.arange(s, dtype=jnp.int32)  # (S,)
        query_slots = self.index + jnp.arange(t, dtype=jnp.int32)  # (T,)
        causal = slots[None, :] <= query_slots[:, None]  # (T, S)
        if window is not None:
            causal &= query_slots[:, None] - slots[None, :] < window
        real = slots[None, :] >= self.start[:, None]  # (B, S)
        mask = causal[None, None] & real[:, None, None, :]  # (B, 1, T, S)
        out = masked_attention(q, k_all, v_all, mask)
        return out, self._replace(k=k_all, v=v_all)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rng: jax.Array | None,
    dropout_rate: float,
    cache: KVCache | None,
    window: int | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Causal attention (training: ``cache`` None), or attention over the cache (decoding);
    ``window``: Mistral's sliding window (None: every earlier token)."""
    if cache is None:
        return causal_attention(q, k, v, rng, dropout_rate, window), None
    return cache.attend(q, k, v, window)


def rotary_positions(cache: KVCache | None, t: int) -> jax.Array | None:
    """Rotary positions of this call's tokens: None in training (0..T-1 for every row)."""
    return None if cache is None else cache.positions(t)
